"""The local unit contract the replicator relies on (`firmware.replicator.ReplicatedUnit`), run against
every implementation.

What the replicator relies on: the geometry; reads of the newest data the host wrote; sync gates,
called once per acknowledged write or flush with the seq of its record, after that record is durable
in the journal and before the host hears the answer, whose error reaches the host; a removed gate is
never called again; while the journal is full (overflow) the host's writes are still served, readable,
not gated, and their regions are in the dirty snapshot; `clear_dirty` forgets a snapshot's regions but
never one that was written again after the snapshot was taken.

Implementations: `firmware.local_unit.LocalUnit` (journal and volume files, a small journal so that it
overflows) and `host_tests.linkkit.FakeLocalUnit`, the stand-in the link tests run on. A new unit
shape (a promoted remote, a relay) is added to `BACKENDS` and passes this suite before the replicator
is run over it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from firmware.journal import Journal
from firmware.journal.format import RING_OFFSET
from firmware.local_unit import LocalUnit, ThrottlePolicy
from firmware.replicator import ReplicatedUnit
from firmware.storage import StorageError, WriteError
from firmware.volume import Volume
from host_tests.linkkit import FakeJournal, FakeLocalUnit

BS = 512
NBLOCKS = 1024
REGION = 8
UNIT = uuid.UUID("77a2c1d0-0000-4000-8000-0000000000aa")


class Backend:
    name = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def make(self) -> ReplicatedUnit:
        raise NotImplementedError

    def durable_seq(self) -> int:
        raise NotImplementedError

    def write(self, lba: int, data: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def fill_until_overflow(self) -> None:
        """Host writes until the journal is full and the unit overflows into its dirty bitmap (a
        remote holds every record)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Local(Backend):
    name = "local-unit"

    def make(self) -> ReplicatedUnit:
        self.vol = Volume(self.tmp / "volume.img", size=NBLOCKS * BS, block_size=BS)
        self.journal = Journal.open(self.tmp / "journal", size=RING_OFFSET + (96 << 10), unit_uuid=UNIT,
                                    block_size=BS)
        self.journal.register_consumer("remote:held")
        self.unit = LocalUnit(self.vol, self.journal, bitmap_path=str(self.tmp / "dirty.bitmap"),
                              region_blocks=REGION, throttle=ThrottlePolicy(max_delay_s=0.0))
        return self.unit

    def durable_seq(self) -> int:
        return self.journal.durable_seq

    def write(self, lba: int, data: bytes) -> None:
        self.unit.write(lba, data)

    def flush(self) -> None:
        self.unit.flush()

    def fill_until_overflow(self) -> None:
        i = 0
        while not self.unit.overflow:
            self.unit.write((i * 4) % 512, _blocks(i, 4))
            i += 1
            assert i < 10000, "the journal never filled"

    def close(self) -> None:
        self.unit.close()
        self.journal.close()
        self.vol.close()


class Fake(Backend):
    name = "fake"

    def make(self) -> ReplicatedUnit:
        self.vol = Volume(self.tmp / "volume.img", size=NBLOCKS * BS, block_size=BS)
        self.journal = FakeJournal(UNIT)
        self.unit = FakeLocalUnit(self.vol, self.journal, region_blocks=REGION)
        return self.unit

    def durable_seq(self) -> int:
        return self.journal.durable_seq

    def write(self, lba: int, data: bytes) -> None:
        self.unit.write(lba, data)

    def flush(self) -> None:
        self.unit.flush()

    def fill_until_overflow(self) -> None:
        self.unit.overflow = True  # the fake's journal never fills by itself: this is its overflow switch

    def close(self) -> None:
        self.vol.close()


BACKENDS: list[type[Backend]] = [Local, Fake]


class Case:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.unit = backend.make()


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    c = Case(request.param(tmp_path))
    try:
        yield c
    finally:
        c.backend.close()


def _blocks(tag: int, n: int = 1) -> bytes:
    return b"".join(bytes([tag & 0xFF, i & 0xFF]) * (BS // 2) for i in range(n))


def test_satisfies_the_protocol_and_geometry(case: Case) -> None:
    u = case.unit
    assert isinstance(u, ReplicatedUnit)
    assert (u.block_size, u.num_blocks, u.region_blocks) == (BS, NBLOCKS, REGION)
    assert u.overflow is False


def test_reads_return_the_newest_data(case: Case) -> None:
    case.backend.write(10, _blocks(1, 4))
    case.backend.write(12, _blocks(2, 1))
    assert case.unit.read(10, 4) == _blocks(1, 4)[: 2 * BS] + _blocks(2, 1) + _blocks(1, 4)[3 * BS:]
    assert case.unit.read(600, 2) == bytes(2 * BS)


def test_a_gate_sees_each_record_once_durable_and_before_the_answer(case: Case) -> None:
    seen: list[tuple[int, int]] = []

    def gate(seq: int) -> None:
        seen.append((seq, case.backend.durable_seq()))

    case.unit.add_sync_gate(gate)
    case.backend.write(0, _blocks(1))
    assert len(seen) == 1  # before write returned
    case.backend.write(1, _blocks(2))
    case.backend.flush()
    assert len(seen) == 3
    seqs = [s for s, _ in seen]
    assert seqs == sorted(set(seqs))
    assert all(durable >= seq for seq, durable in seen)


def test_a_gate_error_reaches_the_host(case: Case) -> None:
    def gate(seq: int) -> None:
        raise WriteError(f"sync remote lost record {seq}")

    case.unit.add_sync_gate(gate)
    with pytest.raises(StorageError):
        case.backend.write(0, _blocks(1))


def test_a_removed_gate_is_never_called(case: Case) -> None:
    calls: list[int] = []
    gate: Callable[[int], None] = calls.append
    case.unit.add_sync_gate(gate)
    case.unit.remove_sync_gate(gate)
    case.unit.remove_sync_gate(gate)  # twice is harmless
    case.backend.write(0, _blocks(1))
    case.backend.flush()
    assert calls == []


def test_no_dirty_regions_while_the_journal_has_room(case: Case) -> None:
    case.backend.write(0, _blocks(1))
    assert case.unit.dirty_snapshot().region_indices == ()


def test_overflow_serves_the_host_ungated_and_marks_its_regions_dirty(case: Case) -> None:
    case.backend.fill_until_overflow()
    assert case.unit.overflow is True
    calls: list[int] = []
    case.unit.add_sync_gate(calls.append)
    case.backend.write(800, _blocks(9, 3))
    assert case.unit.read(800, 3) == _blocks(9, 3)
    assert calls == []
    assert 800 // REGION in case.unit.dirty_snapshot().region_indices


def test_clear_dirty_keeps_regions_written_after_the_snapshot(case: Case) -> None:
    case.backend.fill_until_overflow()
    case.backend.write(800, _blocks(1))
    case.backend.write(900, _blocks(2))
    snap = case.unit.dirty_snapshot()
    assert {800 // REGION, 900 // REGION} <= set(snap.region_indices)
    case.backend.write(900, _blocks(3))  # written again after the snapshot
    cleared = case.unit.clear_dirty(snap)
    left = set(case.unit.dirty_snapshot().region_indices)
    assert 900 // REGION in left
    assert 800 // REGION not in left
    assert cleared == len(snap.region_indices) - 1
