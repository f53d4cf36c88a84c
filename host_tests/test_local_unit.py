"""LocalUnit as the host relies on it: journal first then volume, newest data on read, write-cache
acknowledgement semantics (flush is a real barrier), sync gates, throttle, overflow to the dirty
bitmap and back, and replay after a power cut."""

from __future__ import annotations

import random
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from firmware.journal import Journal, JournalCorrupt, RecordKind
from firmware.journal.format import HEADER_SIZE, RING_OFFSET
from firmware.journal.sim import CrashMode, PowerCut, PowerRail, SimulatedFlash, SimulatedVolume
from firmware.local_unit import LocalUnit, ThrottlePolicy
from firmware.storage import StorageError, WriteError
from firmware.volume import Volume

UNIT = uuid.UUID("87654321-4321-8765-4321-876543218765")
BS = 512
NBLOCKS = 256


@dataclass
class Rig:
    """Journal, volume and bitmap devices on one power rail, and the unit on top."""

    rail: PowerRail = field(default_factory=PowerRail)
    ring: int = 64 * 1024
    jflash: SimulatedFlash = field(init=False)
    vflash: SimulatedFlash = field(init=False)
    bflash: SimulatedFlash = field(init=False)
    sleeps: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.jflash = SimulatedFlash(RING_OFFSET + self.ring, rail=self.rail)
        self.vflash = SimulatedFlash(NBLOCKS * BS, rail=self.rail)
        self.bflash = SimulatedFlash(8192, rail=self.rail)

    def unit(self, **kw: object) -> LocalUnit:
        self.journal = Journal.open(None, size=None, unit_uuid=UNIT, block_size=BS, flash=self.jflash)
        self.volume = SimulatedVolume(self.vflash, block_size=BS)
        kw.setdefault("region_blocks", 16)
        kw.setdefault("sleep", self.sleeps.append)
        kw.setdefault("background_flush", False)  # deterministic device operation order
        self.lu = LocalUnit(self.volume, self.journal, bitmap_flash=self.bflash, **kw)  # type: ignore[arg-type]
        return self.lu

    def power_cut(self, mode: CrashMode = CrashMode.DROP, seed: int = 0, *, stop: bool = True) -> Rig:
        """A new rig holding what the devices keep after the power fails now (`stop=False`: what
        they would keep, and this rig goes on)."""
        if stop:
            self.rail.cut_now()
        rng = random.Random(seed)
        new = Rig(ring=self.ring)
        for name in ("jflash", "vflash", "bflash"):
            old: SimulatedFlash = getattr(self, name)
            setattr(new, name, old.rebooted(rng, mode, rail=new.rail))
        return new


def blk(tag: int, n: int = 1) -> bytes:
    return bytes([tag % 256]) * (BS * n)


def test_write_goes_to_journal_then_volume_and_reads_back() -> None:
    r = Rig()
    lu = r.unit()
    lu.write(10, blk(1, 4))
    assert lu.read(10, 4) == blk(1, 4)
    recs = r.journal.read_records(0, 1 << 20)
    assert [(x.kind, x.lba, x.count) for x in recs] == [(RecordKind.WRITE, 10, 4)]
    assert r.volume.read(10, 4) == blk(1, 4)  # applied to the local mirror
    lu.unmap(11, 2)
    assert lu.read(10, 4) == blk(1) + bytes(2 * BS) + blk(1)
    assert r.journal.read_records(1, 1 << 20)[0].kind is RecordKind.UNMAP


def test_write_cache_off_every_acknowledged_write_survives_a_power_cut() -> None:
    r = Rig()
    lu = r.unit()
    assert not lu.write_cache
    for i in range(20):
        lu.write(i * 3, blk(i, 3))
    for mode in CrashMode:
        r2 = r.power_cut(mode, seed=7)
        lu2 = r2.unit()
        for i in range(20):
            assert lu2.read(i * 3, 3) == blk(i, 3), mode


def test_write_cache_off_ack_waits_for_fdatasync() -> None:
    r = Rig()
    lu = r.unit()
    before = r.jflash.syncs
    lu.write(0, blk(5))
    assert r.jflash.syncs == before + 1
    assert r.journal.durable_seq == r.journal.head_seq


def test_write_cache_on_acks_from_ram_and_flush_is_a_barrier() -> None:
    r = Rig()
    lu = r.unit(write_cache=True)
    syncs = r.jflash.syncs
    lu.write(0, blk(1))
    lu.write(1, blk(2))
    assert r.jflash.syncs == syncs  # acknowledged without touching flash
    assert lu.read(0, 2) == blk(1) + blk(2)  # but reads see it
    assert r.volume.read(0, 2) == bytes(2 * BS)  # not on the volume until durable in the journal
    cut = r.power_cut(CrashMode.KEEP, stop=False)
    assert cut.unit().read(0, 2) == bytes(2 * BS)  # lost: the host was told the cache is volatile
    lu.flush()
    assert r.jflash.syncs == syncs + 1
    recs = r.journal.read_records(0, 1 << 20)
    assert [x.kind for x in recs] == [RecordKind.WRITE, RecordKind.WRITE, RecordKind.FLUSH]
    r2 = r.power_cut(CrashMode.DROP)
    assert r2.unit().read(0, 2) == blk(1) + blk(2)


def test_write_cache_on_fua_write_makes_everything_before_durable() -> None:
    r = Rig()
    lu = r.unit(write_cache=True)
    lu.write(0, blk(1))
    lu.write(1, blk(2), fua=True)
    kinds = [x.kind for x in r.journal.read_records(0, 1 << 20)]
    assert kinds == [RecordKind.WRITE, RecordKind.WRITE, RecordKind.FLUSH]
    lu.write(2, blk(3))  # not durable
    r2 = r.power_cut(CrashMode.DROP)
    assert r2.unit().read(0, 3) == blk(1) + blk(2) + bytes(BS)


def test_turning_the_write_cache_off_flushes() -> None:
    r = Rig()
    lu = r.unit(write_cache=True)
    lu.write(0, blk(9))
    lu.set_write_cache(False)
    assert r.power_cut().unit().read(0, 1) == blk(9)


def test_flush_completes_only_after_concurrent_writes_are_durable() -> None:
    r = Rig(ring=1 << 20)
    lu = r.unit(write_cache=True)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(30):
                lu.write(k * 40 + i, blk(k * 40 + i))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lu.flush()
    assert not errors
    lu2 = r.power_cut().unit()
    for k in range(3):
        for i in range(30):
            assert lu2.read(k * 40 + i, 1) == blk(k * 40 + i)


def test_repeated_flush_adds_one_marker() -> None:
    r = Rig()
    lu = r.unit()
    lu.write(0, blk(1))
    lu.flush()
    lu.flush()
    assert [x.kind for x in r.journal.read_records(0, 1 << 20)] == [RecordKind.WRITE, RecordKind.FLUSH]


def test_sync_gate_runs_after_local_durability_and_before_the_ack() -> None:
    r = Rig()
    lu = r.unit()
    seen: list[tuple[int, int]] = []
    lu.add_sync_gate(lambda seq: seen.append((seq, r.journal.durable_seq)))
    lu.write(0, blk(1))
    assert seen == [(1, 1)]

    def refuse(seq: int) -> None:
        raise WriteError("remote unreachable")

    lu.add_sync_gate(refuse)
    with pytest.raises(StorageError, match="unreachable"):
        lu.write(1, blk(2))
    lu.remove_sync_gate(refuse)
    lu.set_write_cache(True)
    seen.clear()
    lu.write(2, blk(3))
    assert seen == []  # write cache on: gates wait for the barrier
    lu.flush()
    assert len(seen) == 1 and seen[0][0] == r.journal.head_seq


def test_records_are_replayed_onto_the_volume_after_a_power_cut() -> None:
    r = Rig()
    lu = r.unit()
    for i in range(10):
        lu.write(i, blk(i + 1))
    assert r.volume.read(0, 10) != bytes(10 * BS)
    # the volume's page cache is lost, the journal holds the records
    r2 = r.power_cut(CrashMode.DROP)
    assert r2.vflash.durable[: 10 * BS] == bytes(10 * BS)
    lu2 = r2.unit()
    assert lu2.replayed_records == 10
    assert r2.volume.read(0, 10) == b"".join(blk(i + 1) for i in range(10))
    assert r2.journal.applied_seq == 10


def test_tail_waits_for_volume_sync_and_every_consumer() -> None:
    r = Rig(ring=1 << 20)
    lu = r.unit(volume_sync_bytes=1 << 30)
    r.journal.register_consumer("remote")
    for i in range(5):
        lu.write(i, blk(i))
    assert r.journal.tail_seq == 1  # the volume was not synced yet, the remote confirmed nothing
    r.journal.confirm("remote", 5)
    assert r.journal.tail_seq == 1
    lu.flush()
    lu.close()  # syncs the volume
    assert r.journal.tail_seq == 6


def test_throttle_delays_acks_when_nearly_full_and_is_bounded() -> None:
    r = Rig()
    lu = r.unit(throttle=ThrottlePolicy(start_fill=0.5, max_delay_s=0.01, resume_fill=0.3))
    r.journal.register_consumer("slow")
    i = 0
    while r.journal.used_bytes < 0.45 * r.journal.capacity_bytes:
        lu.write(i % NBLOCKS, blk(i))
        i += 1
    assert r.sleeps == []
    while r.journal.used_bytes < 0.9 * r.journal.capacity_bytes:
        lu.write(i % NBLOCKS, blk(i))
        i += 1
    assert r.sleeps and all(0 < d <= 0.01 for d in r.sleeps)
    assert r.sleeps[-1] > r.sleeps[0]
    st = lu.status()["journal"]
    assert isinstance(st, dict) and st["throttle"]["active"] is True


def _fill_until_overflow(lu: LocalUnit, start: int = 0) -> int:
    i = start
    while not lu.overflow:
        lu.write((i * 4) % NBLOCKS, blk(i, 4))
        i += 1
        assert i < 10000
    return i


def test_overflow_tracks_dirty_regions_keeps_serving_and_comes_back() -> None:
    r = Rig()
    lu = r.unit(throttle=ThrottlePolicy(start_fill=0.95, max_delay_s=0.0, resume_fill=0.5))
    r.journal.register_consumer("remote")
    n = _fill_until_overflow(lu)
    st = lu.status()["journal"]
    assert isinstance(st, dict) and st["overflow"] is True and st["dirty_regions"] >= 1
    # the write that overflowed went straight to the volume, durably, and its region is dirty
    last_lba = ((n - 1) * 4) % NBLOCKS
    assert lu.read(last_lba, 4) == blk(n - 1, 4)
    snap = lu.dirty_snapshot()
    assert any(lba <= last_lba < lba + c for lba, c in snap.regions)
    # more writes while full: served, durable, dirty
    lu.write(200, blk(77, 8))
    lu.unmap(0, 16)
    assert lu.read(200, 8) == blk(77, 8) and lu.read(0, 16) == bytes(16 * BS)
    assert lu.dirty_snapshot().blocks >= 32
    r2 = r.power_cut(CrashMode.DROP)
    lu2 = r2.unit(throttle=ThrottlePolicy(start_fill=0.95, max_delay_s=0.0, resume_fill=0.5))
    assert lu2.read(200, 8) == blk(77, 8) and lu2.read(0, 16) == bytes(16 * BS)
    assert lu2.read(last_lba, 4) == blk(n - 1, 4)
    assert lu2.dirty_snapshot().regions == lu.dirty_snapshot().regions  # the bitmap is on flash
    # the remote catches up: journaling resumes on the next write
    r2.journal.confirm("remote", r2.journal.durable_seq)
    before = r2.journal.head_seq
    lu2.write(100, blk(5))
    assert not lu2.overflow and r2.journal.head_seq == before + 1
    assert lu2.status()["journal"]["overflow"] is False  # type: ignore[index]


def test_overflow_direct_writes_are_not_overwritten_by_replay() -> None:
    """Records still in the journal (kept for a remote) must not be replayed over newer data that
    was written straight to the volume while the journal was full."""
    r = Rig()
    lu = r.unit(throttle=ThrottlePolicy(max_delay_s=0.0))
    r.journal.register_consumer("remote")
    lu.write(8, blk(1, 4))  # journaled
    _fill_until_overflow(lu, start=100)
    lu.write(8, blk(2, 4))  # direct
    r2 = r.power_cut(CrashMode.DROP)
    assert r2.unit().read(8, 4) == blk(2, 4)


def test_clear_dirty_keeps_regions_dirtied_after_the_snapshot() -> None:
    r = Rig()
    lu = r.unit()
    lu.mark_dirty(0, 1)
    lu.mark_dirty(40, 20)  # regions 2 and 3
    snap = lu.dirty_snapshot()
    assert snap.regions == ((0, 16), (32, 32))
    lu.mark_dirty(50, 1)  # region 3 again, after the snapshot
    assert lu.clear_dirty(snap) == 2
    assert lu.dirty_snapshot().regions == ((48, 16),)
    r2 = r.power_cut(CrashMode.DROP)
    assert r2.unit().dirty_snapshot().regions == ((48, 16),)


def test_recovery_of_a_full_journal_replays_everything() -> None:
    r = Rig()
    lu = r.unit(throttle=ThrottlePolicy(start_fill=1.0, max_delay_s=0.0), volume_sync_bytes=1 << 30)
    r.journal.register_consumer("remote")
    expect = bytearray(NBLOCKS * BS)
    i = 0
    while r.journal.fits(4 * BS):
        lba = (i * 4) % NBLOCKS
        lu.write(lba, blk(i, 4))
        expect[lba * BS:(lba + 4) * BS] = blk(i, 4)
        i += 1
    assert not lu.overflow
    r2 = r.power_cut(CrashMode.DROP)
    lu2 = r2.unit()
    assert lu2.replayed_records > 0
    assert lu2.read(0, NBLOCKS) == bytes(expect)


def test_corrupted_journal_record_stops_the_unit_from_serving() -> None:
    r = Rig(ring=1 << 20)
    lu = r.unit(volume_sync_bytes=1 << 30)
    for i in range(6):
        lu.write(i, blk(i + 1))
    r.journal.checkpoint()  # head 6 is in the checkpoint; the volume has not been synced
    r2 = r.power_cut(CrashMode.DROP)
    r2.jflash.flip_bit(RING_OFFSET + 2 * 1024 + HEADER_SIZE + 3)  # payload of seq 3
    with pytest.raises(JournalCorrupt) as ei:
        r2.unit()
    assert ei.value.seq == 3


def test_status_reports_the_journal() -> None:
    r = Rig()
    now = [1_000_000_000_000]
    lu = r.unit(wall_clock=lambda: now[0])
    r.journal.register_consumer("remote")
    lu.write(0, blk(1))
    now[0] += 3_000_000_000
    st = lu.status()["journal"]
    assert isinstance(st, dict)
    for key in ("capacity_bytes", "used_bytes", "head_seq", "tail_seq", "durable_seq", "overflow",
                "dirty_regions", "oldest_unconfirmed_age_s", "write_cache", "throttle", "consumers"):
        assert key in st
    assert st["head_seq"] == 1 and st["write_cache"] == "off" and st["overflow"] is False
    assert st["oldest_unconfirmed_age_s"] == pytest.approx(3.0)
    assert st["consumers"] == {"remote": 0}


def test_power_cut_in_the_middle_of_a_write_loses_at_most_that_write() -> None:
    for cut in range(1, 25):
        r = Rig()
        lu = r.unit()
        lu.write(0, blk(1, 2))
        r.rail.cut_at = r.rail.ops + cut
        done = 0
        try:
            for i in range(2, 10):
                lu.write(i * 2, blk(i, 2))
                done = i
        except PowerCut:
            pass
        for mode in (CrashMode.TEAR, CrashMode.PREFIX):
            lu2 = r.power_cut(mode, seed=cut).unit()
            assert lu2.read(0, 2) == blk(1, 2)
            for i in range(2, done + 1):
                assert lu2.read(i * 2, 2) == blk(i, 2)


def test_on_real_files(tmp_path: Path) -> None:
    with Volume(tmp_path / "vol", size=NBLOCKS * BS, block_size=BS) as vol, \
            Journal.open(tmp_path / "journal", size=1 << 20, unit_uuid=UNIT, block_size=BS) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty")) as lu:
        lu.write(3, blk(3, 5))
        lu.set_write_cache(True)
        lu.write(9, blk(4))
        lu.flush()
    assert (tmp_path / "dirty").exists()
    with Volume(tmp_path / "vol", size=NBLOCKS * BS, block_size=BS) as vol, \
            Journal.open(tmp_path / "journal", size=None, unit_uuid=UNIT, block_size=BS) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty")) as lu:
        assert lu.read(3, 7) == blk(3, 5) + bytes(BS) + blk(4)
        assert lu.replayed_records == 0 and j.head_seq == 3


def test_background_volume_sync_lets_the_journal_release_records(tmp_path: Path) -> None:
    import time

    with Volume(tmp_path / "vol", size=NBLOCKS * BS, block_size=BS) as vol, \
            Journal.open(tmp_path / "journal", size=RING_OFFSET + 256 * 1024, unit_uuid=UNIT, block_size=BS) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty"), volume_sync_bytes=16 * 1024) as lu:
        for i in range(64):
            lu.write(i % 32 * 8, blk(i, 8))
        deadline = time.monotonic() + 30
        while j.tail_seq == 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert j.tail_seq > 1  # the flusher synced the volume and the journal let records go
        assert j.applied_seq >= j.tail_seq - 1
        for i in range(32, 64):
            assert lu.read(i % 32 * 8, 8) == blk(i, 8)


class FailingFlash(SimulatedFlash):
    """Flash whose writes start failing with EIO (a worn-out or unplugged device)."""

    broken = False

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self.broken:
            raise OSError(5, "Input/output error")
        super().pwrite(data, offset)


def test_journal_io_error_is_reported_as_sense_and_reads_still_work() -> None:
    r = Rig()
    r.jflash = FailingFlash(RING_OFFSET + r.ring, rail=r.rail)
    lu = r.unit()
    lu.write(0, blk(1))
    r.jflash.broken = True
    with pytest.raises(WriteError) as ei:
        lu.write(1, blk(2))
    assert (ei.value.sense_key, ei.value.asc) == (0x03, 0x0C)  # MEDIUM ERROR, WRITE ERROR
    with pytest.raises(WriteError):
        lu.write(2, blk(3))  # the unit stays failed: durability can no longer be promised
    assert lu.read(0, 1) == blk(1)


def test_no_throttle_once_overflowing() -> None:
    r = Rig()
    lu = r.unit(throttle=ThrottlePolicy(start_fill=0.5, max_delay_s=0.01))
    r.journal.register_consumer("remote")
    _fill_until_overflow(lu)
    before = len(r.sleeps)
    for i in range(5):
        lu.write(i * 8, blk(i, 8))
    assert lu.overflow and len(r.sleeps) == before


def test_a_write_larger_than_a_record_is_split_and_reads_back() -> None:
    r = Rig()  # 64 KiB ring: records of at most ~15 KiB
    lu = r.unit(write_cache=True)
    data = b"".join(blk(i) for i in range(40))
    lu.write(100, data, fua=True)
    recs = r.journal.read_records(0, 1 << 20)
    assert [x.kind for x in recs] == [RecordKind.WRITE, RecordKind.WRITE, RecordKind.FLUSH]
    assert sum(x.count for x in recs if x.kind is RecordKind.WRITE) == 40
    assert lu.read(100, 40) == data
    assert r.power_cut().unit().read(100, 40) == data


def test_salvaged_journal_marks_the_whole_volume_dirty() -> None:
    r = Rig(ring=1 << 20)
    lu = r.unit(volume_sync_bytes=1 << 30)
    for i in range(6):
        lu.write(i * 16, blk(i + 1))
    r.journal.checkpoint()
    r2 = r.power_cut(CrashMode.DROP)
    r2.jflash.flip_bit(RING_OFFSET + 4 * 1024 + HEADER_SIZE + 3)  # payload of seq 5
    r2.journal = Journal.open(None, size=None, unit_uuid=UNIT, block_size=BS, flash=r2.jflash, salvage=True)
    lu2 = LocalUnit(SimulatedVolume(r2.vflash, block_size=BS), r2.journal, bitmap_flash=r2.bflash,
                    region_blocks=16, background_flush=False)
    assert r2.journal.head_seq == 4
    assert lu2.dirty_snapshot().regions == ((0, NBLOCKS),)
    assert lu2.read(0, 1) == blk(1) and lu2.read(48, 1) == blk(4)
