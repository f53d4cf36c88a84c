"""After a journal overflow ends, the records journaled after it must not reach a remote before the
dirty regions written during it: such a remote would hold a later write without the overflow's writes,
an image of the host's disk at no point, and not be marked inconsistent. The replicator sends the
records journaled before the overflow, then resyncs the dirty regions at that position, then the rest."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware import replicator
from firmware.journal import Journal
from firmware.journal.format import RING_OFFSET
from firmware.journal.sim import CrashMode, SimulatedFlash, SimulatedVolume
from firmware.link import protocol as jp
from firmware.local_unit import LocalUnit, ThrottlePolicy
from firmware.replication.source import OPEN_END, dirty_round_covers, records_before_dirty
from host_tests.linkkit import FakeLocalUnit, wait_until
from host_tests.test_replicator_e2e import Rig, random_writes


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, None)
    yield r
    r.close()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[jp.Event]:
    frames: list[jp.Event] = []
    real = replicator._SourceConnection._send

    def spy(self: replicator._SourceConnection, ev: jp.Event) -> None:
        frames.append(ev)
        real(self, ev)

    monkeypatch.setattr(replicator._SourceConnection, "_send", spy)
    return frames


def first_resync_before_records_after(frames: list[jp.Event], boundary: int) -> tuple[int | None, int | None]:
    """(index of the first RESYNC_BEGIN, index of the first batch holding a record after `boundary`)."""
    begin = next((i for i, f in enumerate(frames) if isinstance(f, jp.ResyncBegin)), None)
    late = next((i for i, f in enumerate(frames) if isinstance(f, jp.Batch)
                 and f.records[-1].seq > boundary), None)
    return begin, late


@pytest.mark.parametrize("remote_away", [True, False], ids=["remote-away", "remote-connected"])
def test_records_after_an_overflow_wait_for_its_resync(rig: Rig, sent: list[jp.Event], remote_away: bool) -> None:
    rng = random.Random(77)
    rig.start_remote()
    rig.start_rep()
    rig.wait_streaming()
    random_writes(rig.unit, 20, rng)
    rig.drain()
    if remote_away:
        rig.stop_rep()
    random_writes(rig.unit, 15, rng)  # journaled before the overflow: these may go first
    boundary = rig.journal.head_seq
    rig.unit.overflow = True
    random_writes(rig.unit, 25, rng)  # straight to the volume, regions dirty
    rig.unit.overflow = False
    sent.clear()
    random_writes(rig.unit, 15, rng)  # journaled after the overflow
    assert rig.journal.head_seq > boundary and rig.unit.dirty
    if remote_away:
        rig.start_rep()
    wait_until(lambda: not rig.unit.dirty, what="dirty regions resynced and cleared")
    rig.drain()
    assert rig.same()
    begin, late = first_resync_before_records_after(sent, boundary)
    assert begin is not None and late is not None, sent
    assert begin < late, "a record journaled after the overflow was sent before its dirty regions"
    b = sent[begin]
    assert isinstance(b, jp.ResyncBegin) and b.position <= boundary
    # nothing journaled before the overflow is held back: the resync starts right at the boundary
    assert b.position == boundary


def before(unit: FakeLocalUnit | LocalUnit, covered: int | None) -> int | None:
    token, runs = unit.dirty_runs()
    return records_before_dirty(runs, token, covered)


def test_two_overflows_while_the_remote_is_away_each_get_a_round_at_their_position(
        rig: Rig, sent: list[jp.Event]) -> None:
    rng = random.Random(79)
    rig.start_remote()
    rig.start_rep()
    rig.wait_streaming()
    random_writes(rig.unit, 10, rng)
    rig.drain()
    rig.stop_rep()
    heads = []
    for _ in range(2):
        random_writes(rig.unit, 10, rng)
        heads.append(rig.journal.head_seq)
        rig.unit.overflow = True
        random_writes(rig.unit, 20, rng)
        rig.unit.overflow = False
    random_writes(rig.unit, 10, rng)
    sent.clear()
    rig.start_rep()
    wait_until(lambda: not rig.unit.dirty, what="dirty regions resynced and cleared")
    rig.drain()
    assert rig.same()
    rounds = [(i, f.position) for i, f in enumerate(sent) if isinstance(f, jp.ResyncBegin)]
    assert len(rounds) == 2 and rounds[0][1] == heads[0] and rounds[1][1] >= heads[1], (rounds, heads)
    early = [f.records[-1].seq for f in sent[:rounds[0][0]] if isinstance(f, jp.Batch)
             and f.records[-1].seq > heads[0]]
    assert not early, f"records up to {early[-1]} sent before the round at {heads[0]}"
    # the first round cannot hold the second run (the records replayed after it are older than
    # those writes): it leaves the resync open, the remote marked inconsistent, until the second
    ends = [f.position for f in sent if isinstance(f, jp.ResyncEnd)]
    assert ends[0] == OPEN_END and ends[1] != OPEN_END


def test_the_dirty_runs_name_the_last_record_before_the_writes_a_remote_lacks(rig: Rig) -> None:
    rng = random.Random(78)
    u, j = rig.unit, rig.journal
    assert before(u, None) is None
    random_writes(u, 5, rng)
    first = j.head_seq
    u.overflow = True
    random_writes(u, 3, rng)
    u.overflow = False
    covered_first = u.dirty_snapshot().token
    random_writes(u, 5, rng)
    second = j.head_seq
    u.overflow = True
    random_writes(u, 3, rng)
    u.overflow = False
    assert before(u, None) == first
    assert before(u, covered_first) == second  # holds the first run's regions
    assert before(u, u.dirty_snapshot().token) is None
    token, runs = u.dirty_runs()
    # a round at the first run's position holds the first run only (the records replayed after it
    # overwrite the second run's writes); at the second run's position it holds both
    assert dirty_round_covers(runs, token, first) == (covered_first, False)
    assert dirty_round_covers(runs, token, second) == (token, True)
    u.clear_dirty(u.dirty_snapshot())
    assert before(u, None) is None


def test_the_local_unit_names_the_last_record_before_its_overflow_writes() -> None:
    unit_id, bs = uuid.UUID("70270e00-0000-4000-8000-0000000000aa"), 512
    jflash, vflash, bflash = SimulatedFlash(RING_OFFSET + 64 * 1024), SimulatedFlash(256 * bs), SimulatedFlash(8192)

    def open_unit() -> tuple[Journal, LocalUnit]:
        j = Journal.open(None, size=None, unit_uuid=unit_id, block_size=bs, flash=jflash)
        lu = LocalUnit(SimulatedVolume(vflash, block_size=bs), j, write_cache=False, bitmap_flash=bflash,
                       throttle=ThrottlePolicy(start_fill=0.7, max_delay_s=0.0, resume_fill=0.4),
                       region_blocks=8, sleep=lambda s: None, background_flush=False)
        j.register_consumer("remote", start_seq=0)
        return j, lu

    j, lu = open_unit()
    rng = random.Random(5)
    assert before(lu, None) is None
    while not lu.overflow:  # nobody confirms: the journal fills
        lu.write(rng.randrange(248), rng.randbytes(8 * bs))
    last = j.head_seq
    lu.write(3, rng.randbytes(bs))  # straight to the volume
    assert lu.dirty_snapshot().regions and before(lu, None) == last
    assert before(lu, lu.dirty_snapshot().token) is None
    j.confirm("remote", j.durable_seq)  # the remote caught up: the journal has room again
    lu.write(100, rng.randbytes(bs))
    assert not lu.overflow and j.head_seq > last
    assert before(lu, None) == last
    lu.close()
    j.close()
    jflash, vflash, bflash = (f.rebooted(rng, CrashMode.KEEP) for f in (jflash, vflash, bflash))
    j, lu = open_unit()  # after a restart the bits have no known position: every record held waits
    assert before(lu, None) == j.tail_seq - 1 and lu.dirty_runs()[1] == ((0, j.tail_seq - 1, j.head_seq),)
    lu.clear_dirty(lu.dirty_snapshot())
    assert before(lu, None) is None
    lu.close()
    j.close()
