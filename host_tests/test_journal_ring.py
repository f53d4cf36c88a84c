"""The journal ring: append/sync/read, group commit, wrap-around, a full journal, consumers, and
recovery after power cuts (torn tails dropped, damaged durable records reported, never served)."""

from __future__ import annotations

import functools
import queue
import random
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from firmware.journal import Journal, JournalCorrupt, JournalError, JournalFull, RecordKind, RecordsGone
from firmware.journal.format import CHECKPOINT_OFFSETS, HEADER_SIZE, RING_OFFSET, SUPERBLOCK_OFFSET
from firmware.journal.sim import CrashMode, PowerCut, PowerRail, SimulatedFlash

UNIT = uuid.UUID("12345678-1234-5678-1234-567812345678")
RING = 64 * 1024


def new_flash(ring: int = RING, rail: PowerRail | None = None) -> SimulatedFlash:
    return SimulatedFlash(RING_OFFSET + ring, rail=rail)


def open_j(flash: SimulatedFlash, **kw: object) -> Journal:
    return Journal.open(None, size=None, unit_uuid=UNIT, block_size=512, flash=flash, **kw)  # type: ignore[arg-type]


def reboot(flash: SimulatedFlash, mode: CrashMode = CrashMode.DROP, seed: int = 0) -> SimulatedFlash:
    """The device as it is after a power cut."""
    return flash.rebooted(random.Random(seed), mode)


def payload(seq: int, blocks: int = 1) -> bytes:
    return (seq.to_bytes(4, "little") * 128) * blocks


def test_append_sync_read_round_trip() -> None:
    j = open_j(new_flash())
    seqs = [j.append(RecordKind.WRITE, i, 1, payload(i), now_ns=1000 + i) for i in range(5)]
    seqs.append(j.append(RecordKind.UNMAP, 7, 3, b"", now_ns=2000))
    seqs.append(j.append(RecordKind.FLUSH, 0, 0, b"", now_ns=2001))
    assert seqs == list(range(1, 8))
    assert j.head_seq == 7 and j.durable_seq == 0
    assert j.read_records(0, 1 << 20) == []  # nothing durable yet
    assert j.sync() == 7
    recs = j.read_records(0, 1 << 20)
    assert [r.seq for r in recs] == seqs
    assert recs[2].kind is RecordKind.WRITE and recs[2].lba == 2 and recs[2].payload == payload(2)
    assert recs[2].timestamp_ns == 1002
    assert (recs[5].kind, recs[5].lba, recs[5].count, recs[5].payload) == (RecordKind.UNMAP, 7, 3, b"")
    assert recs[6].kind is RecordKind.FLUSH
    # max_bytes bounds the answer, but at least one record comes back
    assert [r.seq for r in j.read_records(2, 1)] == [3]
    assert [r.seq for r in j.read_records(2, 2048)] == [3, 4]  # 1024 bytes each on flash


def test_append_rejects_inconsistent_records() -> None:
    j = open_j(new_flash())
    with pytest.raises(ValueError):
        j.append(RecordKind.WRITE, 0, 2, b"x" * 512, 0)
    with pytest.raises(ValueError):
        j.append(RecordKind.UNMAP, 0, 2, b"x", 0)
    with pytest.raises(ValueError):
        j.append(RecordKind.WRITE, 0, 64, bytes(64 * 512), 0)  # bigger than a quarter of the ring


def test_group_commit_one_fdatasync_for_many_records() -> None:
    f = new_flash(ring=1 << 20)
    j = open_j(f)
    before = f.syncs
    for i in range(20):
        j.append(RecordKind.WRITE, i, 1, payload(i), 0)
    j.sync()
    assert f.syncs - before == 1
    assert j.sync() == 20 and f.syncs - before == 1  # nothing queued: no I/O


def test_batches_are_bounded_so_recovery_can_look_ahead() -> None:
    f = new_flash()  # max batch = a quarter of the 64 KiB ring
    j = open_j(f)
    before = f.syncs
    for i in range(40):
        j.append(RecordKind.WRITE, i, 1, payload(i), 0)  # 1 KiB each on flash
    j.sync()
    assert f.syncs - before == 3


def test_concurrent_syncs_share_fdatasyncs() -> None:
    f = SimulatedFlash(RING_OFFSET + 1024 * 1024)
    j = open_j(f)
    before = f.syncs
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(50):
                s = j.append(RecordKind.WRITE, k * 100 + i, 1, payload(i), 0)
                assert j.sync() >= s
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert j.durable_seq == 200
    assert f.syncs - before <= 200
    assert [r.seq for r in j.read_records(0, 1 << 30)] == list(range(1, 201))


class _HeldSyncFlash(SimulatedFlash):
    """The first fdatasync after `hold = True` waits for `release`: a slow flash, deterministically."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def sync(self) -> None:
        if self.hold:
            self.hold = False
            self.entered.set()
            self.release.wait(30)
        super().sync()


def test_syncs_waiting_for_a_write_in_progress_share_one_fdatasync() -> None:
    f = _HeldSyncFlash(RING_OFFSET + RING)
    j = open_j(f)
    j.append(RecordKind.WRITE, 0, 1, payload(1), 0)
    f.hold = True
    first = threading.Thread(target=j.sync)
    first.start()
    assert f.entered.wait(30)  # record 1 is being made durable
    before = f.syncs
    for i in range(2, 5):
        j.append(RecordKind.WRITE, i, 1, payload(i), 0)
    results: list[int] = []
    waiters = [threading.Thread(target=lambda: results.append(j.sync())) for _ in range(3)]
    for t in waiters:
        t.start()
    f.release.set()
    for t in [first, *waiters]:
        t.join(30)
        assert not t.is_alive()
    assert results == [4, 4, 4]
    # record 1's fdatasync, then a single one for records 2-4 that all three callers share
    assert f.syncs - before == 2


class _GatedSyncFlash(SimulatedFlash):
    """While `gated`, every flash sync covers the writes made before it started (as fdatasync does)
    and waits for a gate of its own, handed out in `started`: syncs held in flight at once and
    released in any order; a gate with `fail` set makes its sync fail."""

    def __init__(self, size: int, parallel: int) -> None:
        super().__init__(size)
        self.parallel_syncs = parallel
        self.gated = False
        self.started: queue.Queue[_Gate] = queue.Queue()

    def sync(self) -> None:
        if not self.gated:
            super().sync()
            return
        covers = self.sync_begin()
        gate = _Gate()
        self.started.put(gate)
        assert gate.wait(30)
        if gate.fail:
            raise OSError(5, "flash write failed")
        self.sync_end(covers)


class _Gate(threading.Event):
    fail = False


def _in_thread(fn: Callable[[], int]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)
    t = threading.Thread(target=run)
    t.start()
    return t, out


@pytest.mark.parametrize("parallel", [1, 4])
def test_a_sync_makes_durable_only_the_records_written_before_it_started(parallel: int) -> None:
    # record 2 is written while record 1's flash sync is in flight: that sync does not cover it, so
    # its caller must not hear "durable" until a sync that started after it returned
    f = _GatedSyncFlash(RING_OFFSET + RING, parallel)
    j = open_j(f)
    j.append(RecordKind.WRITE, 0, 1, payload(1), 0)
    f.gated = True
    a, a_out = _in_thread(j.sync)
    gate_a = f.started.get(timeout=30)
    j.append(RecordKind.WRITE, 1, 1, payload(2), 0)
    b, b_out = _in_thread(j.sync)
    if parallel > 1:  # record 2 written and its own sync in flight beside record 1's
        gate_b = f.started.get(timeout=30)
    gate_a.set()
    a.join(30)
    assert a_out == [1]
    assert j.durable_seq == 1 and b.is_alive() and not b_out
    assert open_j(reboot(f)).head_seq == 1  # a power cut now keeps record 1 only: as promised
    if parallel == 1:  # its sync starts only now
        gate_b = f.started.get(timeout=30)
    assert b.is_alive()
    gate_b.set()
    b.join(30)
    assert b_out == [2] and j.durable_seq == 2
    assert [r.seq for r in open_j(reboot(f)).read_records(0, 1 << 20)] == [1, 2]


def test_overlapping_syncs_may_end_in_any_order_and_a_failed_one_fails_the_next() -> None:
    f = _GatedSyncFlash(RING_OFFSET + RING, 4)
    j = open_j(f)
    f.gated = True
    j.append(RecordKind.WRITE, 0, 1, payload(1), 0)
    a, a_out = _in_thread(j.sync)
    gate_a = f.started.get(timeout=30)
    j.append(RecordKind.WRITE, 1, 1, payload(2), 0)
    b, b_out = _in_thread(j.sync)
    gate_b = f.started.get(timeout=30)
    gate_b.set()  # the later sync ends first: it covers records 1 and 2
    b.join(30)
    assert b_out == [2] and j.durable_seq == 2
    gate_a.set()
    a.join(30)
    assert a_out == [2] and j.durable_seq == 2  # never moves back
    # a sync that fails while a later one is in flight: the later one does not count either
    j.append(RecordKind.WRITE, 2, 1, payload(3), 0)
    c, c_out = _in_thread(j.sync)
    gate_c = f.started.get(timeout=30)
    j.append(RecordKind.WRITE, 3, 1, payload(4), 0)
    d, d_out = _in_thread(j.sync)
    gate_d = f.started.get(timeout=30)
    gate_c.fail = True
    gate_c.set()
    c.join(30)
    gate_d.set()
    d.join(30)
    assert isinstance(c_out[0], JournalError) and isinstance(d_out[0], JournalError)
    assert j.durable_seq == 2
    with pytest.raises(JournalError):
        j.append(RecordKind.WRITE, 4, 1, payload(5), 0)


def test_wrap_around_keeps_every_record_intact() -> None:
    f = new_flash()
    j = open_j(f)
    expected: dict[int, bytes] = {}
    rng = random.Random(3)
    for _ in range(400):
        blocks = rng.choice([1, 2, 7, 15])
        try:
            s = j.append(RecordKind.WRITE, 0, blocks, payload(j.head_seq + 1, blocks), 0)
        except JournalFull:
            j.sync()
            j.set_applied(j.durable_seq - 3)  # keep a few behind the head
            s = j.append(RecordKind.WRITE, 0, blocks, payload(j.head_seq + 1, blocks), 0)
        expected[s] = payload(s, blocks)
        if rng.random() < 0.3:
            j.sync()
    j.sync()
    assert j.head_seq == 400
    assert j.superblock.ring_size == RING
    # many laps were made; what is retained reads back exactly, across the ring end
    recs = j.read_records(j.tail_seq - 1, 1 << 30)
    assert [r.seq for r in recs] == list(range(j.tail_seq, 401))
    assert all(r.payload == expected[r.seq] for r in recs)
    # and the same after a power cut
    j2 = open_j(reboot(f))
    assert j2.head_seq == 400 and j2.tail_seq <= recs[0].seq
    assert [r.payload for r in j2.read_records(recs[0].seq - 1, 1 << 30)] == [r.payload for r in recs]


def test_full_journal_raises_and_frees_when_tail_advances() -> None:
    j = open_j(new_flash())
    j.register_consumer("remote")
    n = 0
    with pytest.raises(JournalFull):
        while True:
            j.append(RecordKind.WRITE, n, 8, payload(n, 8), 0)
            n += 1
    assert j.free_bytes < 8 * 512 + HEADER_SIZE + 512
    j.sync()
    j.set_applied(j.durable_seq)
    with pytest.raises(JournalFull):  # the consumer still holds everything
        j.append(RecordKind.WRITE, 0, 8, payload(0, 8), 0)
    j.confirm("remote", 5)
    assert j.tail_seq == 6
    j.append(RecordKind.WRITE, 0, 8, payload(0, 8), 0)
    j.sync()


def test_recovery_of_a_full_journal() -> None:
    f = new_flash()
    j = open_j(f)
    j.register_consumer("remote")
    recs: list[int] = []
    while True:
        try:
            s = j.append(RecordKind.WRITE, 0, 4, payload(len(recs), 4), 0)
        except JournalFull:
            break
        recs.append(s)
    j.sync()
    j2 = open_j(reboot(f))
    assert j2.head_seq == recs[-1] and j2.tail_seq == 1
    assert j2.consumers() == {"remote": 0}
    got = j2.read_records(0, 1 << 30)
    assert [r.seq for r in got] == recs
    assert all(r.payload == payload(i, 4) for i, r in enumerate(got))
    with pytest.raises(JournalFull):
        j2.append(RecordKind.WRITE, 0, 4, payload(0, 4), 0)


def test_consumers_and_tail_survive_restart() -> None:
    f = new_flash()
    j = open_j(f)
    assert j.register_consumer("a") == 0
    assert j.register_consumer("b") == 0
    for i in range(10):
        j.append(RecordKind.WRITE, i, 1, payload(i), 0)
    j.sync()
    j.set_applied(10)
    j.confirm("a", 8)
    j.confirm("b", 4)
    assert j.tail_seq == 5
    with pytest.raises(ValueError):
        j.confirm("a", 11)  # not durable
    with pytest.raises(KeyError):
        j.confirm("nobody", 1)
    j.checkpoint()
    j2 = open_j(reboot(f))
    assert j2.consumers() == {"a": 8, "b": 4}
    assert j2.register_consumer("a") == 8
    assert j2.tail_seq == 5 and j2.head_seq == 10 and j2.applied_seq == 10
    with pytest.raises(RecordsGone):
        j2.read_records(2, 100)
    j2.unregister_consumer("b")
    assert j2.tail_seq == 9
    j3 = open_j(reboot(j2._flash))  # type: ignore[arg-type]
    assert j3.consumers() == {"a": 8} and j3.tail_seq == 9


def test_wait_for_records_wakes_on_sync() -> None:
    j = open_j(new_flash())
    assert j.wait_for_records(0, 0.01) is False
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(j.wait_for_records(0, 30)))
    t.start()
    j.append(RecordKind.FLUSH, 0, 0, b"", 0)
    j.sync()
    t.join()
    assert result == [True]


@pytest.mark.parametrize("mode", list(CrashMode))
def test_power_cut_during_sync_keeps_every_durable_record(mode: CrashMode) -> None:
    for cut in range(1, 12):
        rail = PowerRail()
        f = new_flash(rail=rail)
        j = open_j(f)
        for i in range(5):
            j.append(RecordKind.WRITE, i, 2, payload(i, 2), 0)
        j.sync()
        rail.cut_at = rail.ops + cut
        acked = 5
        try:
            for i in range(5, 40):
                j.append(RecordKind.WRITE, i, 2, payload(i, 2), 0)
                if i % 3 == 0:
                    acked = j.sync()
        except PowerCut:
            pass
        for seed in range(4):
            j2 = open_j(reboot(f, mode, seed))
            assert j2.recovery.corruption is None
            assert acked <= j2.head_seq <= 40
            got = j2.read_records(0, 1 << 30)
            assert [r.seq for r in got] == list(range(1, j2.head_seq + 1))
            assert all(r.payload == payload(r.seq - 1, 2) for r in got)


def test_torn_record_at_the_tail_is_discarded() -> None:
    f = new_flash()
    j = open_j(f)
    for i in range(3):
        j.append(RecordKind.WRITE, i, 4, payload(i, 4), 0)
    j.sync()
    # the next record reaches flash only partly: header and first sector, not the rest
    j.append(RecordKind.WRITE, 3, 4, payload(3, 4), 0)
    j._write_batch_locked = None  # type: ignore[assignment,method-assign]  # never called below
    rec_pos = j._idx_pos[-1]
    queued = j._queue[-1]
    buf = queued.head + bytes(queued.payload)  # the record as it would lie in the ring
    from firmware.journal.format import seal_header

    seal_header(buf, kind=1, epoch=j.superblock.epoch, incarnation=j._incarnation, seq=4, durable_before=3,
                lba=3, count=4, payload_len=2048, timestamp_ns=0, payload_crc=j._queue[-1].payload_crc)
    f.pwrite(bytes(buf[:512]), RING_OFFSET + rec_pos)
    f.sync()
    j2 = open_j(reboot(f))
    assert j2.head_seq == 3
    assert j2.recovery.torn_tail and j2.recovery.stop_reason == "payload checksum mismatch"
    assert j2.recovery.corruption is None
    # new records take its place
    j2.append(RecordKind.WRITE, 9, 1, payload(9), 0)
    j2.sync()
    assert [r.lba for r in j2.read_records(3, 1 << 20)] == [9]


def _fill_batches(j: Journal, batches: int, per: int = 3) -> None:
    for b in range(batches):
        for i in range(per):
            n = b * per + i
            j.append(RecordKind.WRITE, n, 2, payload(n, 2), 0)
        j.sync()


@pytest.mark.parametrize("where", ["payload", "header"])
def test_flipped_bit_in_a_durable_record_is_reported_with_its_position(where: str) -> None:
    f = new_flash()
    j = open_j(f)
    _fill_batches(j, 4)
    j.checkpoint()  # head seq 12 is in the checkpoint
    _fill_batches(j, 2)  # more batches after the checkpoint
    pos = j._idx_pos[7 - 1]  # record seq 7
    off = RING_OFFSET + pos % RING + (HEADER_SIZE + 100 if where == "payload" else 20)
    f.flip_bit(off, 3)
    with pytest.raises(JournalCorrupt) as ei:
        j.read_records(5, 1 << 20)
    assert ei.value.seq == 7
    with pytest.raises(JournalCorrupt) as ei:
        open_j(reboot(f))
    assert ei.value.seq == 7 and ei.value.position == pos
    assert ei.value.device_offset == RING_OFFSET + pos % RING
    assert "seq=7" in str(ei.value)


def test_flipped_bit_after_the_checkpoint_is_told_from_a_torn_tail() -> None:
    """Record 14 is in a batch written after the last checkpoint; the batch after it proves that
    it had been durable, so it is corruption, not a torn write."""
    f = new_flash()
    j = open_j(f)
    _fill_batches(j, 4)
    j.checkpoint()
    _fill_batches(j, 3)
    pos = j._idx_pos[14 - 1]
    f.flip_bit(RING_OFFSET + pos % RING + HEADER_SIZE + 7)
    with pytest.raises(JournalCorrupt) as ei:
        open_j(reboot(f))
    assert ei.value.seq == 14
    # salvage cuts the journal there and says so
    j2 = open_j(reboot(f), salvage=True)
    assert j2.head_seq == 13 and j2.recovery.corruption is not None and j2.recovery.corruption.seq == 14


def test_flipped_bit_in_the_last_batch_after_a_clean_close_is_corruption() -> None:
    f = new_flash()
    j = open_j(f)
    _fill_batches(j, 3)
    j.close()  # clean shutdown checkpoints the head
    pos = RING_OFFSET + (9 - 1) * 1536  # record 9 (2 blocks + header = 1536 bytes each)
    f.flip_bit(pos + 600)
    with pytest.raises(JournalCorrupt):
        open_j(reboot(f))


def test_checkpoint_slots_alternate_and_a_damaged_one_falls_back() -> None:
    f = new_flash()
    j = open_j(f)
    _fill_batches(j, 2)
    j.set_applied(4)
    j.checkpoint()
    newest = j._ckpt_slot
    f.flip_bit(CHECKPOINT_OFFSETS[newest] + 30)
    j2 = open_j(reboot(f))
    assert j2.recovery.checkpoint_slot == 1 - newest
    assert any("checksum" in n for n in j2.recovery.notes)
    assert j2.head_seq == 6  # the older checkpoint's tail still leads to every record
    f2 = reboot(j2._flash)  # type: ignore[arg-type]
    f2.flip_bit(CHECKPOINT_OFFSETS[0] + 100)
    f2.flip_bit(CHECKPOINT_OFFSETS[1] + 100)
    with pytest.raises(JournalCorrupt, match="no valid checkpoint"):
        open_j(f2)


def test_damaged_superblock_uses_the_backup() -> None:
    f = new_flash()
    j = open_j(f)
    _fill_batches(j, 1)
    f.flip_bit(SUPERBLOCK_OFFSET + 17)
    j2 = open_j(reboot(f))
    assert j2.head_seq == 3 and any("backup" in n for n in j2.recovery.notes)


def test_stale_records_of_an_earlier_run_are_not_resurrected() -> None:
    """Records of a batch torn by a power cut stay on flash; after a restart re-uses their seqs, a
    second cut must not make them part of the journal again."""
    rail = PowerRail()
    f = new_flash(rail=rail)
    j = open_j(f)
    _fill_batches(j, 1)  # seqs 1..3 durable
    for i in range(3, 8):  # seqs 4..8, one batch
        j.append(RecordKind.WRITE, i, 1, payload(i), 0)
    rail.cut_at = rail.ops + 2  # the batch's pwrite lands, its fdatasync does not
    with pytest.raises(PowerCut):
        j.sync()
    # the drive lost only record 4's first sector
    img = bytearray(f.current)
    pos4 = RING_OFFSET + j._idx_pos[3]
    img[pos4: pos4 + 512] = f.durable[pos4: pos4 + 512]
    f2 = SimulatedFlash(f.size, image=bytes(img))
    j2 = open_j(f2)
    assert j2.head_seq == 3
    j2.append(RecordKind.WRITE, 50, 1, payload(50), 0)  # seq 4 again, same length, same place
    j2.sync()
    j3 = open_j(reboot(f2))
    assert j3.head_seq == 4  # old 5..8 from the previous run are not picked up
    assert [r.lba for r in j3.read_records(3, 1 << 20)] == [50]


def test_other_units_journal_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "journal"
    with Journal.open(p, size=1 << 20, unit_uuid=UNIT, block_size=512) as j:
        assert j.recovery.created and p.stat().st_size == 1 << 20
        j.append(RecordKind.WRITE, 1, 1, payload(1), 0)
    with pytest.raises(JournalError, match="belongs to unit"):
        Journal.open(p, size=None, unit_uuid=uuid.uuid4(), block_size=512)
    with pytest.raises(JournalError, match="512-byte blocks"):
        Journal.open(p, size=None, unit_uuid=UNIT, block_size=4096)
    with Journal.open(p, size=None, unit_uuid=UNIT, block_size=512) as j:
        assert not j.recovery.created and j.head_seq == 1  # close() made it durable
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * (1 << 20))
    with pytest.raises(JournalError, match="not a usbmirror journal"):
        Journal.open(junk, size=None, unit_uuid=UNIT, block_size=512)


def test_confirmations_are_checkpointed_as_the_ring_fills() -> None:
    f = new_flash()
    j = open_j(f)
    j.register_consumer("remote")
    for i in range(4):
        j.append(RecordKind.WRITE, i, 1, payload(i), 0)
    j.sync()
    j.confirm("remote", 3)
    for i in range(12):  # more than an eighth of the ring: the next batch checkpoints
        j.append(RecordKind.WRITE, i, 1, payload(i), 0)
        j.sync()
    j2 = open_j(reboot(f, CrashMode.DROP))
    assert j2.consumers() == {"remote": 3}


@functools.lru_cache(maxsize=1)
def _reference_image() -> tuple[bytes, dict[int, bytes]]:
    """A journal image that wrapped a few times, with what each retained seq holds."""
    f = new_flash()
    j = open_j(f)
    held: dict[int, bytes] = {}
    rng = random.Random(11)
    for _ in range(150):
        blocks = rng.choice([1, 3, 8])
        data = bytes([rng.randrange(256)]) * (512 * blocks)
        try:
            s = j.append(RecordKind.WRITE, rng.randrange(1000), blocks, data, 0)
        except JournalFull:
            j.sync()
            j.set_applied(j.durable_seq - 5)  # keep a few records before the head
            s = j.append(RecordKind.WRITE, rng.randrange(1000), blocks, data, 0)
        held[s] = data
        if rng.random() < 0.4:
            j.sync()
    j.sync()
    return bytes(f.durable), held


@settings(max_examples=200, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, RING_OFFSET + RING - 1), st.integers(0, 7)), min_size=1,
                      max_size=6),
       smash=st.none() | st.tuples(st.integers(0, RING_OFFSET + RING - 512), st.binary(min_size=1, max_size=512)))
def test_damaged_images_never_yield_wrong_records(flips: list[tuple[int, int]],
                                                  smash: tuple[int, bytes] | None) -> None:
    """Whatever is damaged, opening either fails with JournalError or every record it serves is
    exactly the one that was written with that seq."""
    image, held = _reference_image()
    img = bytearray(image)
    for off, bit in flips:
        img[off] ^= 1 << bit
    if smash is not None:
        img[smash[0]: smash[0] + len(smash[1])] = smash[1]
    try:
        j = open_j(SimulatedFlash(len(img), image=bytes(img)))
        recs = j.read_records(j.tail_seq - 1, 1 << 30)
    except JournalError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("opened" + (" (damage went unused)" if len(recs) == 150 - j.tail_seq + 1 else " and cut"))
    for r in recs:
        assert r.payload == held[r.seq], f"seq {r.seq} served wrong data"


def test_power_cut_during_format_leaves_a_device_that_opens() -> None:
    for cut in range(1, 9):  # every operation of format and of the first checkpoint
        rail = PowerRail(cut_at=cut)
        f = new_flash(rail=rail)
        with pytest.raises(PowerCut):
            open_j(f)
        for mode in CrashMode:
            j = open_j(reboot(f, mode, cut))
            j.append(RecordKind.FLUSH, 0, 0, b"", 0)
            assert j.sync() == 1
