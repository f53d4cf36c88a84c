"""The old primary comes back (sans-IO): a replica when only the promoted side moved on and every
unshipped write is from before the promotion (those writes counted as the failover's loss), split
brain when it wrote after the promotion or at an unknown time, refused when unrelated; the state is
only rewritten when something changed."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from firmware.failover.generations import DataGeneration, History, Outcome, WriteInfo
from firmware.failover.returning import old_primary_returns
from firmware.failover.state import RoleState
from firmware.journal import Journal
from firmware.local_unit import LocalUnit
from firmware.storage import WriteProtected
from firmware.volume import Volume

G1 = DataGeneration(0x11, 1, 100, 0)
PROMOTED = DataGeneration(0x22, 2, 5_000, 10)  # promoted at t=5000 from position 10
OWN = RoleState("s1", True, History((G1,)))
PEER = History((G1, PROMOTED))


def _w(seq: int, ts: int, n: int = 4096) -> WriteInfo:
    return WriteInfo(seq, ts, n)


def test_writes_from_before_the_promotion_are_the_loss_and_the_unit_becomes_a_replica() -> None:
    writes = [_w(9, 10), _w(10, 20), _w(11, 4_000), _w(12, 4_999, 512)]  # 9 and 10 reached the promoted copy
    r = old_primary_returns(OWN, peer="dr1", peer_history=PEER, peer_dirty=True, peer_dirty_bytes=1 << 20,
                            unshipped=writes, unknown_time_bytes=0, now_ns=7_000)
    assert r.decision.outcome is Outcome.REMOTE_NEWER and r.refuse_writes
    assert (r.loss.lost_writes, r.loss.lost_bytes, r.loss.diverged_writes) == (2, 4096 + 512, 0)
    assert r.state.primary is False and r.state.history == OWN.history  # takes the peer's only after a catch-up
    assert r.state.failover_loss is not None
    assert r.state.failover_loss["writes"] == 2 and r.state.failover_loss["bytes"] == 4608
    assert r.state.failover_loss["generation"] == PROMOTED.label and r.state.failover_loss["peer"] == "dr1"
    assert "2 writes (4608 bytes)" in r.message and "failover's loss" in r.message
    again = old_primary_returns(r.state, peer="dr1", peer_history=PEER, peer_dirty=True, peer_dirty_bytes=1 << 20,
                                unshipped=writes, unknown_time_bytes=0, now_ns=9_000)
    assert again.state is r.state and again.refuse_writes  # nothing new to save on the next refusal


def test_no_unshipped_writes_is_a_replica_with_no_loss() -> None:
    r = old_primary_returns(OWN, peer="dr1", peer_history=PEER, peer_dirty=False, peer_dirty_bytes=0,
                            unshipped=[], unknown_time_bytes=0, now_ns=7_000)
    assert r.decision.outcome is Outcome.REMOTE_NEWER and r.refuse_writes
    assert r.state.failover_loss is not None and r.state.failover_loss["writes"] == 0


def test_a_write_after_the_promotion_is_a_split_brain_and_changes_nothing_else() -> None:
    writes = [_w(11, 4_000), _w(12, 5_000, 8192)]
    r = old_primary_returns(OWN, peer="dr1", peer_history=PEER, peer_dirty=True, peer_dirty_bytes=3 << 20,
                            unshipped=writes, unknown_time_bytes=0, now_ns=7_000)
    assert r.decision.outcome is Outcome.SPLIT_BRAIN and not r.refuse_writes
    assert r.state.primary is True and r.state.failover_loss is None
    sb = r.state.split_brain
    assert sb is not None and (sb.own_bytes, sb.peer_bytes, sb.own, sb.peer_generation) == (8192, 3 << 20, G1,
                                                                                           PROMOTED)
    assert r.state.status()["split_brain"] is True
    assert "this unit wrote 0.0 MiB (1 writes) after dr1 was promoted, dr1 wrote 3.0 MiB" in r.message


def test_writes_of_unknown_time_count_as_written_after_the_promotion() -> None:
    r = old_primary_returns(OWN, peer="dr1", peer_history=PEER, peer_dirty=False, peer_dirty_bytes=0,
                            unshipped=[_w(11, 10)], unknown_time_bytes=1 << 20, now_ns=7_000)
    assert r.decision.outcome is Outcome.SPLIT_BRAIN and r.state.primary is True


def test_both_moved_on_is_a_split_brain_and_unrelated_is_refused() -> None:
    mine = RoleState("s1", True, History((G1, DataGeneration(0x33, 2, 6_000, 12))))
    r = old_primary_returns(mine, peer="dr1", peer_history=PEER, peer_dirty=True, peer_dirty_bytes=0,
                            unshipped=[], unknown_time_bytes=0, now_ns=7_000)
    assert r.decision.outcome is Outcome.SPLIT_BRAIN and r.state.split_brain is not None
    other = History((DataGeneration(0x99, 1, 1, 0), DataGeneration(0x98, 2, 2, 0)))
    u = old_primary_returns(OWN, peer="dr1", peer_history=other, peer_dirty=False, peer_dirty_bytes=0,
                            unshipped=[], unknown_time_bytes=0, now_ns=7_000)
    assert u.decision.outcome is Outcome.UNRELATED and u.state is OWN and not u.refuse_writes
    assert "unrelated" in u.message


def test_a_replica_local_unit_refuses_writes_with_write_protected_and_keeps_reading(tmp_path: Path) -> None:
    with Volume(tmp_path / "v.img", size=64 * 512, block_size=512) as vol, \
            Journal.open(tmp_path / "j", size=1 << 20, unit_uuid=uuid.uuid4(), block_size=512) as journal, \
            LocalUnit(vol, journal, bitmap_path=str(tmp_path / "b")) as unit:
        unit.write(3, b"\x01" * 512)
        unit.refuse_writes("this unit is a replica of dr1")
        assert unit.read_only and unit.write_refusal == "this unit is a replica of dr1"
        with pytest.raises(WriteProtected, match="replica of dr1"):
            unit.write(3, b"\x02" * 512)
        with pytest.raises(WriteProtected):
            unit.unmap(0, 8)
        assert unit.read(3, 1) == b"\x01" * 512
        head = journal.head_seq
        unit.flush()
        assert journal.head_seq <= head + 1  # at most the flush's own record: no write reached the journal
        unit.refuse_writes(None)
        unit.write(3, b"\x03" * 512)
        assert unit.read(3, 1) == b"\x03" * 512 and not unit.read_only
