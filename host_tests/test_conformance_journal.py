"""The journal contract a replication source relies on (`firmware.replicator.ReplicatedJournal`, the
`SourceJournal` of the sans-IO source session plus identity and timestamps), run against every
implementation.

What the source relies on: durable records are read back in order with consecutive sequence numbers
and their kind, address, payload and timestamp intact; a read takes at most `max_bytes` (at least one
record) so a window can be filled page by page without gaps; only durable records are ever shipped; a
new consumer starts at the head (what is already on the disk is the initial sync's job), a known one at
its confirmed position, and confirmations never move backwards, never past what is durable, never for
an unknown consumer; records a consumer has not confirmed stay readable, released ones raise
`RecordsGone`; `wait_for_records` and the durable listeners wake a waiting link when records become
durable.

Implementations: the real ring (`firmware.journal.Journal`, on a file) and the in-memory
`host_tests.linkkit.FakeJournal` that the link tests run on. A new journal (a relay's received stream)
is added to `BACKENDS` and passes this suite before a source session is run over it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.journal import Journal, RecordKind, RecordsGone
from firmware.replication.source import RECORD_OVERHEAD
from firmware.replicator import ReplicatedJournal
from host_tests.linkkit import FakeJournal

BS = 512
UNIT = uuid.UUID("5d3c2b1a-0000-4000-8000-00000000c0de")


class Backend:
    name = ""
    durable_at_once = True  # an appended record is durable when append returns

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def make(self) -> ReplicatedJournal:
        raise NotImplementedError

    def write(self, kind: RecordKind, lba: int, count: int, payload: bytes) -> int:
        """Append one record the way the implementation's producer does and make it durable."""
        raise NotImplementedError

    def append_only(self, kind: RecordKind, lba: int, count: int, payload: bytes) -> int:
        """Append a record without making it durable (only when not `durable_at_once`)."""
        raise NotImplementedError

    def make_durable(self) -> None:
        raise NotImplementedError

    def release_through(self, seq: int) -> None:
        """Everything up to `seq` is safe elsewhere as far as the producer is concerned (the local
        volume holds it): the journal may drop what every consumer confirmed."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Ring(Backend):
    name = "ring"
    durable_at_once = False

    def make(self) -> ReplicatedJournal:
        self.j = Journal.open(self.tmp / "journal", size=1 << 20, unit_uuid=UNIT, block_size=BS)
        return self.j

    def write(self, kind: RecordKind, lba: int, count: int, payload: bytes) -> int:
        seq = self.append_only(kind, lba, count, payload)
        self.j.sync()
        return seq

    def append_only(self, kind: RecordKind, lba: int, count: int, payload: bytes) -> int:
        return self.j.append(kind, lba, count, payload, time.time_ns())

    def make_durable(self) -> None:
        self.j.sync()

    def release_through(self, seq: int) -> None:
        self.j.set_applied(seq)

    def close(self) -> None:
        self.j.close()


class Fake(Backend):
    name = "fake"

    def make(self) -> ReplicatedJournal:
        self.j = FakeJournal(UNIT)
        return self.j

    def write(self, kind: RecordKind, lba: int, count: int, payload: bytes) -> int:
        return self.j.append(kind, lba, count, payload)

    def release_through(self, seq: int) -> None:
        self.j.release_through(seq)

    def close(self) -> None:
        pass


BACKENDS: list[type[Backend]] = [Ring, Fake]


class Case:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.j = backend.make()

    def write_some(self, n: int, start_lba: int = 0) -> list[int]:
        seqs = []
        for i in range(n):
            if i % 4 == 3:
                seqs.append(self.backend.write(RecordKind.FLUSH, 0, 0, b""))
            else:
                seqs.append(self.backend.write(RecordKind.WRITE, start_lba + i, 1, _block(i)))
        return seqs


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    c = Case(request.param(tmp_path))
    try:
        yield c
    finally:
        c.backend.close()


def _block(i: int) -> bytes:
    return bytes([i & 0xFF]) * (BS // 2) + bytes([(i * 3 + 1) & 0xFF]) * (BS // 2)


def _read_all(j: ReplicatedJournal, after: int, max_bytes: int) -> list[int]:
    seqs: list[int] = []
    while True:
        page = j.read_records(after, max_bytes)
        if not page:
            return seqs
        seqs.extend(r.seq for r in page)
        after = page[-1].seq


def test_satisfies_the_protocol(case: Case) -> None:
    assert isinstance(case.j, ReplicatedJournal)
    assert case.j.unit_uuid == UNIT
    assert isinstance(case.j.generation, int)


def test_an_empty_journal(case: Case) -> None:
    j = case.j
    assert j.head_seq == j.durable_seq == j.tail_seq - 1
    assert j.read_records(j.head_seq, 1 << 20) == []
    assert j.wait_for_records(j.head_seq, 0.02) is False


def test_durable_records_read_back_in_order_and_intact(case: Case) -> None:
    j = case.j
    first = j.head_seq + 1
    seqs = case.write_some(6)
    mark = case.backend.write(RecordKind.MARK, 0, 0, b"before-upgrade")
    unmap = case.backend.write(RecordKind.UNMAP, 40, 8, b"")
    assert [*seqs, mark, unmap] == list(range(first, first + 8))
    assert j.head_seq == j.durable_seq == unmap
    recs = j.read_records(first - 1, 1 << 20)
    assert [r.seq for r in recs] == [*seqs, mark, unmap]
    for i, r in enumerate(recs[:6]):
        if i % 4 == 3:
            assert (r.kind, r.lba, r.count, bytes(r.payload)) == (RecordKind.FLUSH, 0, 0, b"")
        else:
            assert (r.kind, r.lba, r.count, bytes(r.payload)) == (RecordKind.WRITE, i, 1, _block(i))
    assert (recs[6].kind, bytes(recs[6].payload)) == (RecordKind.MARK, b"before-upgrade")
    assert (recs[7].kind, recs[7].lba, recs[7].count) == (RecordKind.UNMAP, 40, 8)
    for r in recs:
        assert j.timestamp_of(r.seq) == r.timestamp_ns
        assert abs(r.timestamp_ns - time.time_ns()) < 60 * 10**9
    assert j.timestamp_of(unmap + 1) is None
    assert j.timestamp_of(first - 1) is None


def test_a_read_starts_after_the_position_given(case: Case) -> None:
    seqs = case.write_some(5)
    assert [r.seq for r in case.j.read_records(seqs[1], 1 << 20)] == seqs[2:]
    assert case.j.read_records(seqs[-1], 1 << 20) == []


@pytest.mark.parametrize("max_bytes", [1, BS + RECORD_OVERHEAD, 3 * (BS + RECORD_OVERHEAD) + 10, 1 << 20])
def test_a_read_takes_at_most_max_bytes_and_pages_without_gaps(case: Case, max_bytes: int) -> None:
    seqs = case.write_some(12)
    page = case.j.read_records(seqs[0] - 1, max_bytes)
    assert page and page[0].seq == seqs[0]
    if len(page) > 1:
        assert sum(len(r.payload) + RECORD_OVERHEAD for r in page) <= max_bytes
    assert _read_all(case.j, seqs[0] - 1, max_bytes) == seqs


@pytest.mark.parametrize("backend", [b for b in BACKENDS if not b.durable_at_once], ids=lambda b: b.name)
def test_only_durable_records_are_read_or_waited_for(backend: type[Backend], tmp_path: Path) -> None:
    """For journals with a durability point of their own (a record is durable after a sync)."""
    case = Case(backend(tmp_path))
    try:
        _only_durable(case)
    finally:
        case.backend.close()


def _only_durable(case: Case) -> None:
    j = case.j
    done = case.backend.write(RecordKind.WRITE, 0, 1, _block(0))
    pending = case.backend.append_only(RecordKind.WRITE, 1, 1, _block(1))
    assert j.head_seq == pending and j.durable_seq == done
    assert [r.seq for r in j.read_records(0, 1 << 20)] == [done]
    assert j.wait_for_records(done, 0.02) is False
    case.backend.make_durable()
    assert j.wait_for_records(done, 0.02) is True
    assert [r.seq for r in j.read_records(done, 1 << 20)] == [pending]


def test_a_new_consumer_starts_at_the_head_a_known_one_where_it_confirmed(case: Case) -> None:
    j = case.j
    seqs = case.write_some(5)
    assert j.register_consumer("remote:a") == seqs[-1]
    more = case.write_some(3, start_lba=100)
    assert j.register_consumer("remote:a") == seqs[-1]
    j.confirm("remote:a", more[0])
    assert j.register_consumer("remote:a") == more[0]
    j.confirm("remote:a", seqs[0])  # never backwards
    assert j.register_consumer("remote:a") == more[0]
    assert j.register_consumer("remote:b") == more[-1]


def test_a_confirmation_past_the_durable_end_or_for_a_stranger_is_refused(case: Case) -> None:
    j = case.j
    seqs = case.write_some(3)
    j.register_consumer("remote:a")
    with pytest.raises(ValueError):
        j.confirm("remote:a", seqs[-1] + 1)
    with pytest.raises(KeyError):
        j.confirm("remote:nobody", seqs[0])
    assert j.register_consumer("remote:a") == seqs[-1]


def test_records_a_consumer_has_not_confirmed_stay_and_released_ones_are_gone(case: Case) -> None:
    j = case.j
    start = j.register_consumer("remote:a")
    seqs = case.write_some(8)
    case.backend.release_through(seqs[-1])
    assert _read_all(j, start, 1 << 20) == seqs  # remote:a has confirmed none of them
    j.confirm("remote:a", seqs[3])
    case.backend.release_through(seqs[-1])
    assert j.tail_seq == seqs[4]
    with pytest.raises(RecordsGone):
        j.read_records(seqs[2], 1 << 20)
    assert _read_all(j, seqs[3], 1 << 20) == seqs[4:]
    assert j.timestamp_of(seqs[2]) is None


def test_a_waiting_link_wakes_when_a_record_becomes_durable(case: Case) -> None:
    j = case.j
    head = j.head_seq
    heard = threading.Event()
    j.add_durable_listener(heard.set)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(j.wait_for_records(head, 10.0)))
    waiter.start()
    time.sleep(0.05)
    case.backend.write(RecordKind.WRITE, 7, 1, _block(7))
    waiter.join(10)
    assert woke == [True]
    assert heard.is_set()


def test_a_removed_listener_is_not_called(case: Case) -> None:
    calls: list[int] = []
    listener = lambda: calls.append(1)  # noqa: E731
    case.j.add_durable_listener(listener)
    case.backend.write(RecordKind.FLUSH, 0, 0, b"")
    assert calls
    case.j.remove_durable_listener(listener)
    calls.clear()
    case.backend.write(RecordKind.FLUSH, 0, 0, b"")
    assert calls == []
    case.j.remove_durable_listener(listener)  # removing twice is harmless
