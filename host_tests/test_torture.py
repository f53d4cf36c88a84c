"""A short run of the fault campaign of `make torture` (host_tests/torture.py): every fault kind is
injected, nothing acknowledged is lost, the remote is always a prefix image (or marked inconsistent),
no record is applied twice, nothing wedges; a seed replays the same campaign; and the checks do
catch a remote that drops a record."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest

from firmware.failover.state import RoleStore
from firmware.journal import Journal
from firmware.local_roles import LocalRoles
from firmware.local_unit import LocalUnit
from firmware.replication.target import TargetSession
from host_tests import torture, torture_failover
from host_tests.torture import Campaign, Counts, HostModel, MemRemote, run
from host_tests.torture_real import real_round


def test_a_short_campaign_injects_every_fault_and_keeps_every_property(
        record_property: Callable[[str, object], None]) -> None:
    t0 = time.monotonic()
    counts, failure = run(seed=13, seconds=0, steps=20_000)
    # the campaign's last line, printed in the summary of `make test` (host_tests/conftest.py)
    record_property("summary_line", torture.summary(13, round(time.monotonic() - t0), counts))
    assert failure is None, f"seed=13: {failure}"
    c = dataclasses.asdict(counts)
    assert {k: c[k] for k in ("lost", "prefix_violations", "applied_twice", "wedges")} == \
        {"lost": 0, "prefix_violations": 0, "applied_twice": 0, "wedges": 0}
    for fault in ("cuts", "kills", "link_faults", "corrupt_frames", "enospc", "overflows", "resyncs",
                  "promotions", "failbacks", "promoted_writes", "split_brains", "resolved", "failovers_refused"):
        assert c[fault] > 0, f"no {fault} injected: {c}"
    assert counts.real_promotions == counts.real_failbacks == 0  # all of them in process
    assert counts.acked > 1000 and counts.steps == 20_000


def test_a_seed_replays_the_same_campaign() -> None:
    a, _ = run(seed=99, seconds=0, steps=3000)
    b, _ = run(seed=99, seconds=0, steps=3000)
    assert a == b
    c, _ = run(seed=100, seconds=0, steps=3000)
    assert c != a


def test_a_remote_that_skips_a_record_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = MemRemote._write
    skipped: list[int] = []
    writes = [0]

    def lossy(self: MemRemote, lba: int, data: bytes) -> None:
        writes[0] += 1
        if writes[0] % 97 == 0 and not self.full:
            skipped.append(lba)  # now and then a record's blocks never reach the target
            return
        real_write(self, lba, data)

    monkeypatch.setattr(MemRemote, "_write", lossy)
    counts, failure = run(seed=13, seconds=0, steps=20_000)
    assert skipped and failure is not None
    assert counts.prefix_violations == 1


def test_the_last_line_has_the_documented_form(capsys: pytest.CaptureFixture[str]) -> None:
    assert torture.main(["--seed", "5", "--steps", "500", "--real-share", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    keys = [kv.split("=")[0] for kv in last.removeprefix("torture: ").split()]
    assert keys == ["seed", "seconds", "cuts", "kills", "link_faults", "corrupt_frames", "enospc", "overflows",
                    "promotions", "failbacks", "real_rounds", "acked", "lost", "prefix_violations", "applied_twice",
                    "wedges"]
    assert last.startswith("torture: seed=5 ") and last.endswith("lost=0 prefix_violations=0 applied_twice=0 wedges=0")
    camp = Campaign(5)  # a campaign can also be stepped by hand to study a seed
    camp.step()
    assert camp.c.steps == 1


def test_records_shipped_before_the_overflow_resync_are_a_prefix_violation(monkeypatch: pytest.MonkeyPatch) -> None:
    # the source as it was: records journaled after an overflow go out before its dirty regions;
    # the campaign checks the remote in that window too and must report it
    # (seed 3 meets that window early since the campaign also cuts the remote's power)
    monkeypatch.setattr(torture, "records_before_dirty", lambda runs, token, covered: None)
    counts, failure = run(seed=3, seconds=0, steps=20_000)
    assert failure is not None and "no image of the host's writes" in failure
    assert counts.prefix_violations == 1


def test_a_round_with_real_processes_kills_fails_over_and_back_and_keeps_every_property() -> None:
    c = Counts()
    real_round(21, 0, c, HostModel, fail_over=True, ops=10)
    assert (c.real_rounds, c.promotions, c.failbacks) == (1, 1, 1)
    assert c.kills >= 1 and c.acked >= 5
    assert (c.lost, c.prefix_violations, c.applied_twice, c.wedges) == (0, 0, 0, 0)


def test_a_failure_is_shrunk_to_a_short_trace_that_reproduces_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # an injected bug, for this test only: the remote never writes block 100 (a record or a region)
    real_write = MemRemote._write

    def blind(self: MemRemote, lba: int, data: bytes) -> None:
        if lba <= 100 < lba + len(data) // torture.BS:
            keep = bytes(self.blocks[100 * torture.BS:101 * torture.BS])
            real_write(self, lba, data)
            self.blocks[100 * torture.BS:101 * torture.BS] = keep
        else:
            real_write(self, lba, data)

    monkeypatch.setattr(MemRemote, "_write", blind)
    counts, failure = run(seed=31, seconds=0, steps=5000)
    assert failure is not None
    kind = torture.failure_kind(counts)
    assert kind == "prefix_violations"
    trace, minimal = torture.minimize(31, range(1, counts.steps + 1), kind, budget_s=120)
    assert minimal and len(trace) <= 12 < counts.steps, trace
    c, again = torture.replay(31, trace)
    assert again is not None and torture.failure_kind(c) == kind
    for i in range(len(trace)):  # 1-minimal: without any one of its steps the failure is gone
        c, without = torture.replay(31, trace[:i] + trace[i + 1:])
        assert without is None or torture.failure_kind(c) != kind
    lines = torture.report_failure(31, counts.steps, kind, budget_s=120)
    assert lines[0].startswith(f"torture: shortest trace found ({len(trace)} of {counts.steps} steps, 1-minimal")
    assert f"TORTURE_TRACE={','.join(map(str, trace))}" in lines[0]
    assert f"assert torture.replay(31, [{','.join(map(str, trace))}])[1] is None" in lines[-1]
    monkeypatch.undo()  # without the bug, the trace is a regression test that passes
    assert torture.replay(31, trace)[1] is None


def test_a_remote_that_hides_its_torn_writes_after_a_power_cut_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # the remote as it was: after a power cut its target may hold torn writes of records it had not
    # made durable, and it claimed to be consistent (promotable) until the source sent them again
    counts, failure = run(seed=13, seconds=0, steps=20_000)
    assert failure is None and counts.promotion_checks > 0 and counts.promotions_refused > 0
    assert counts.remote_torn_checks > 0
    monkeypatch.setattr(TargetSession, "reapplying", property(lambda self: False))
    counts, failure = run(seed=13, seconds=0, steps=20_000)
    assert failure is not None and "no image of the host's writes" in failure
    assert counts.prefix_violations == 1


def test_a_failback_that_leaves_the_standby_hosts_writes_on_the_remote_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # an injected bug, for this test only: the failback pulls no region, so the standby host's
    # writes never come home; the in-process failover's checks must report it
    def nothing(self: LocalUnit, lba: int, data: bytes) -> None:
        pass

    monkeypatch.setattr(LocalUnit, "install", nothing)
    counts, failure = run(seed=13, seconds=0, steps=20_000)
    assert failure is not None and "after failback the local disk" in failure
    assert counts.lost == 1


def test_the_old_primary_that_misses_its_cached_writes_after_a_promotion_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the old primary as it was: it counted only the journal's durable records, so writes answered
    # with the write cache on after the promotion were missed (seed 5 meets it: the failback wedged)
    assert run(seed=5, seconds=0, steps=4000)[1] is None

    class Unsynced:  # the journal as the old primary read it: no sync first
        def __init__(self, journal: Journal) -> None:
            self.journal = journal

        def sync(self) -> int:
            return self.journal.durable_seq

        def __getattr__(self, name: str) -> Any:
            return getattr(self.journal, name)

    class OldRoles(LocalRoles):
        def __init__(self, roles: RoleStore, unit: Any, journal: Any) -> None:
            super().__init__(roles, unit, Unsynced(journal))

    monkeypatch.setattr(torture_failover, "LocalRoles", OldRoles)
    counts, failure = run(seed=5, seconds=0, steps=4000)
    assert failure is not None and "failback did not complete" in failure, failure
    assert counts.wedges == 1


def test_seed_1121756141_trace() -> None:
    # a failover, then a kill of the local unit: the journal replayed the old primary's lost writes
    # over the blocks the failback had pulled (the applied position was not checkpointed)
    assert torture.replay(1121756141, [687204, 687242])[1] is None
