"""What a returning local unit counts as written since it and the promoted remote last agreed
(`LocalRoles.changes_since`), and when it refuses to vouch for that set (the failback then compares
every region)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from firmware.journal import RecordsGone
from firmware.journal.bitmap import DirtySnapshot
from firmware.journal.format import RecordKind
from firmware.link import protocol as jp
from firmware.local_roles import LocalRoles


class Journal:
    def __init__(self, records: list[tuple[int, RecordKind, int, int]], tail_seq: int, generation: int = 7) -> None:
        self.records = [SimpleNamespace(seq=s, kind=k, lba=a, count=n) for s, k, a, n in records]
        self.tail_seq = tail_seq  # the oldest record still held
        self.generation = generation
        self.durable_seq = max((s for s, *_ in records), default=tail_seq - 1)

    def read_records(self, after_seq: int, max_bytes: int) -> list[Any]:
        if after_seq < self.tail_seq - 1:
            raise RecordsGone(f"records after {after_seq} were released")
        return [r for r in self.records if r.seq > after_seq][:2]  # a short chunk: the caller loops


def roles_for(journal: Journal, dirty: tuple[tuple[int, int], ...] = (), last_resync: Any = None) -> LocalRoles:
    unit = SimpleNamespace(dirty_snapshot=lambda: DirtySnapshot(1, dirty, ()))
    roles = SimpleNamespace(state=SimpleNamespace(last_resync=last_resync))
    return LocalRoles(roles, unit, journal)  # type: ignore[arg-type]


def reply(applied_seq: int, generation: int = 7) -> jp.HelloReply:
    return jp.HelloReply("dr1", bytes(16), applied_seq, generation, jp.Feature.DIRTY_MAP)


RECS = [(10, RecordKind.WRITE, 100, 8), (11, RecordKind.FLUSH, 0, 0), (12, RecordKind.UNMAP, 4096, 16),
        (13, RecordKind.MARK, 0, 0), (14, RecordKind.WRITE, 9000, 1), (15, RecordKind.WRITE, 30, 2)]


def test_the_writes_and_unmaps_after_the_fork_and_the_dirty_regions() -> None:
    lr = roles_for(Journal(RECS, tail_seq=10), dirty=((2048, 2048),))
    assert lr.changes_since(11, reply(11)) == ([(4096, 16), (9000, 1), (30, 2), (2048, 2048)], "")
    assert lr.changes_since(9, reply(9))[0] == [(100, 8), (4096, 16), (9000, 1), (30, 2), (2048, 2048)]


def test_records_released_after_a_rollback_are_covered_by_the_remote_from_its_applied_position() -> None:
    lr = roles_for(Journal(RECS, tail_seq=13))  # 10..12 were acknowledged and released
    # the copy applied up to 12 and was rolled back to 9: only what it never had comes from here
    assert lr.changes_since(9, reply(12)) == ([(9000, 1), (30, 2)], "")
    mine, why = lr.changes_since(9, reply(9))  # no rollback: the records after the fork are gone
    assert mine is None and "no longer holds the records after seq 9" in why


def test_a_restarted_journal_or_an_interrupted_full_attempt_is_not_trusted() -> None:
    mine, why = roles_for(Journal(RECS, tail_seq=10)).changes_since(11, reply(11, generation=6))
    assert mine is None and "journal restarted (generation 7; the remote followed generation 6)" in why
    mine, why = roles_for(Journal(RECS, tail_seq=10)).changes_since(20, reply(20))
    assert mine is None and "ends at seq 15, before the promotion's seq 20" in why
    pending = {"failback_pending": "full", "mode_reason": "the remote's bitmap is missing"}
    mine, why = roles_for(Journal(RECS, tail_seq=10), last_resync=pending).changes_since(11, reply(11))
    assert mine is None and "an interrupted failback compared every region" in why
