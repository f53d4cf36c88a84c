"""End to end over loopback with real TLS sockets: a local unit's writes reach the remote target
byte for byte; resume, initial sync, overflow resync, sync mode and verify."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from firmware.pairing import TlsFiles, pair
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
from firmware.replicator import RemoteSpec, Replicator, ReplicatorTuning
from firmware.volume import Volume
from host_tests.linkkit import FakeJournal, FakeLocalUnit, wait_until

SIZE = 4 << 20
BS = 512
FAST = ReplicatorTuning(heartbeat_interval_s=0.5, dead_after_s=3.0, backoff_initial_s=0.05, backoff_max_s=0.5,
                        connect_timeout_s=3.0, sync_timeout_s=20.0, drain_timeout_s=30.0)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pair")
    pair(d, "r1", ["src-a", "src-b"])
    return d


class Rig:
    def __init__(self, tmp: Path, tls_dir: Path | None) -> None:
        self.tmp = tmp
        self.tls_dir = tls_dir
        self.stack = ExitStack()
        self.target = tmp / "target.img"
        self.remote: RemoteUnit | None = None
        self.port = 0
        self.vol = self.stack.enter_context(Volume(tmp / "local.img", size=SIZE, block_size=BS, write_cache=True))
        self.journal = FakeJournal()
        self.unit = FakeLocalUnit(self.vol, self.journal)
        self.rep: Replicator | None = None

    def start_remote(self, targets: dict[str, str] | None = None, **kw: object) -> RemoteUnit:
        cfg = RemoteUnitConfig(listen=("127.0.0.1", self.port), name="r1",
                               targets=targets or {"src-a": str(self.target)},
                               tls_dir=str(self.tls_dir) if self.tls_dir else None, state_dir=str(self.tmp / "rstate"),
                               heartbeat_timeout_s=5.0, **kw)  # type: ignore[arg-type]
        self.remote = RemoteUnit(cfg)
        self.remote.start()
        self.port = self.remote.port
        return self.remote

    def stop_remote(self) -> None:
        if self.remote is not None:
            self.remote.stop()
            self.remote = None

    def start_rep(self, port: int | None = None, mode: str = "async", source_id: str = "src-a",
                  tuning: ReplicatorTuning = FAST, tls: TlsFiles | None = None,
                  host: str = "127.0.0.1") -> Replicator:
        if tls is None and self.tls_dir:
            tls = TlsFiles.for_source(self.tls_dir, source_id)
        self.rep = Replicator(self.unit, self.journal, source_id=source_id,
                              remotes=[RemoteSpec((host, port or self.port), mode=mode, name="r1")],
                              tls=tls, state_dir=str(self.tmp / "lstate"), tuning=tuning, plaintext=tls is None)
        self.rep.start()
        return self.rep

    def wait_streaming(self) -> None:
        """The first session of a new target is an initial sync; wait for it before counting records."""
        rep = self.rep
        assert rep is not None
        wait_until(lambda: rep.links[0].state.name == "STREAMING", what="link streaming")

    def stop_rep(self) -> None:
        if self.rep is not None:
            self.rep.close()
            self.rep = None

    def drain(self) -> None:
        assert self.rep is not None
        rep = self.rep
        wait_until(lambda: rep.links[0].acked_seq >= self.journal.head_seq, what="remote to acknowledge all")

    def same(self) -> bool:
        self.vol.flush()
        return self.target.read_bytes() == (self.tmp / "local.img").read_bytes()

    def close(self) -> None:
        self.stop_rep()
        self.stop_remote()
        self.stack.close()


@pytest.fixture
def rig(tmp_path: Path, tls_dir: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, tls_dir)
    yield r
    r.close()


def random_writes(unit: FakeLocalUnit, n: int, rng: random.Random, max_blocks: int = 64) -> None:
    for _ in range(n):
        count = rng.randint(1, max_blocks)
        lba = rng.randrange(0, unit.num_blocks - count)
        unit.write(lba, rng.randbytes(count * BS))
        if rng.random() < 0.1:
            unit.flush()
        if rng.random() < 0.05:
            unit.unmap(rng.randrange(0, unit.num_blocks - 8), 8)


def test_writes_reach_remote_byte_for_byte(rig: Rig) -> None:
    rng = random.Random(1)
    rig.start_remote()
    rig.start_rep()
    random_writes(rig.unit, 300, rng)
    rig.drain()
    assert rig.same()
    st = rig.rep.status()["remotes"][0]  # type: ignore[union-attr]
    assert st["state"] == "streaming" and st["acked_seq"] == rig.journal.head_seq and st["lag_records"] == 0
    assert {"address", "state", "mode", "acked_seq", "lag_bytes"} <= set(st)
    assert rig.journal.consumers()["remote:r1"] == rig.journal.head_seq  # the journal may forget them now
    src = rig.remote.status()["sources"][0]  # type: ignore[union-attr]
    assert src["applied_seq"] == rig.journal.head_seq
    assert src["duplicates_skipped"] == 0


def test_initial_sync_of_volume_with_data_sends_only_differences(rig: Rig) -> None:
    rng = random.Random(2)
    data = rng.randbytes(SIZE)
    rig.vol.write(0, data)
    # the target already holds most of it (say, restored from a backup): only 3 regions differ
    rig.target.write_bytes(data)
    with open(rig.target, "r+b") as f:
        for region in (1, 7, 20):
            f.seek(region * 128 * BS + 100)
            f.write(b"stale!")
    rig.start_remote()
    rep = rig.start_rep()
    wait_until(lambda: rep.status()["remotes"][0]["resync"]["percent"] == 100.0, what="resync done")
    rig.drain()
    assert rig.same()
    rs = rep.status()["remotes"][0]["resync"]
    # only the 3 stale regions crossed the link as data; the others as digests
    assert rs["bytes_copied"] == 3 * 128 * BS
    assert rs["regions_done"] == rs["regions_total"] == SIZE // (128 * BS)
    random_writes(rig.unit, 20, rng)
    rig.drain()
    assert rig.same()


def test_resync_after_journal_overflow_while_remote_away(rig: Rig) -> None:
    rng = random.Random(3)
    rig.start_remote()
    rig.start_rep()
    random_writes(rig.unit, 50, rng)
    rig.drain()
    rig.stop_rep()
    # the journal fills while the remote is away: writes go straight to the volume, regions go dirty
    random_writes(rig.unit, 20, rng)
    rig.unit.overflow = True
    random_writes(rig.unit, 40, rng)
    rig.unit.overflow = False
    random_writes(rig.unit, 10, rng)
    assert rig.unit.dirty
    rep = rig.start_rep()
    wait_until(lambda: not rig.unit.dirty, what="dirty regions resynced and cleared")
    rig.drain()
    assert rig.same(), _debug_diff(rig)
    st = rep.status()["remotes"][0]["resync"]
    assert st["reason"] == "journal overflow" and st["percent"] == 100.0
    assert st["bytes_copied"] <= len(rig.unit.cleared[-1].region_indices) * 128 * BS


def test_overflow_while_connected(rig: Rig) -> None:
    rng = random.Random(31)
    rig.start_remote()
    rig.start_rep()
    random_writes(rig.unit, 30, rng)
    rig.unit.overflow = True
    random_writes(rig.unit, 30, rng)
    rig.unit.overflow = False
    random_writes(rig.unit, 30, rng)
    wait_until(lambda: not rig.unit.dirty, what="dirty regions resynced and cleared")
    rig.drain()
    assert rig.same(), _debug_diff(rig)


def test_records_gone_from_journal_forces_full_resync(rig: Rig) -> None:
    rng = random.Random(32)
    rig.start_remote()
    rig.start_rep()
    random_writes(rig.unit, 30, rng)
    rig.drain()
    rig.stop_rep()
    random_writes(rig.unit, 30, rng)
    rig.journal.drop_before(rig.journal.head_seq - 2)  # e.g. the consumer had been unregistered
    rep = rig.start_rep()
    rig.drain()
    wait_until(lambda: rep.status()["remotes"][0]["resync"]["percent"] == 100.0, what="resync done")
    assert rep.status()["remotes"][0]["resync"]["reason"] == "records no longer in the journal"
    rig.drain()
    assert rig.same(), _debug_diff(rig)


def test_sync_mode_acknowledges_after_remote(rig: Rig) -> None:
    rng = random.Random(4)
    rig.start_remote()
    rep = rig.start_rep(mode="sync")
    wait_until(lambda: rep.links[0].state.name == "STREAMING", what="link up")
    for _ in range(20):
        count = rng.randint(1, 16)
        lba = rng.randrange(0, rig.unit.num_blocks - count)
        rig.unit.write(lba, rng.randbytes(count * BS))
        # the gate returned: the remote already has this write durable
        assert rig.remote.targets["src-a"].state.applied_seq >= rig.journal.head_seq  # type: ignore[union-attr]
    assert rig.same()
    assert rep.status()["remotes"][0]["mode"] == "sync"


def test_no_tls_files_is_refused_unless_plaintext_asked(rig: Rig) -> None:
    with pytest.raises(ValueError, match="needs TLS files"):
        Replicator(rig.unit, rig.journal, source_id="src-a", remotes=[RemoteSpec("127.0.0.1:1")], tls_dir="")


def test_verify_matches_then_finds_planted_difference(rig: Rig) -> None:
    rng = random.Random(5)
    rig.start_remote()
    rep = rig.start_rep()
    random_writes(rig.unit, 100, rng)
    rig.drain()
    report = rep.verify()
    assert report["match"] and report["remotes"][0]["match"] and report["remotes"][0]["differences"] == []
    # plant a difference behind the replicator's back on the remote target
    with open(rig.target, "r+b") as f:
        f.seek(37 * 128 * BS + 5)
        f.write(b"\xff\x00\xff")
        f.flush()
        os.fsync(f.fileno())
    report = rep.verify()
    r0 = report["remotes"][0]
    assert not report["match"] and not r0["match"]
    assert r0["differences"] == [{"region": 37, "lba": 37 * 128, "count": 128}]


def _debug_diff(rig: Rig) -> list[int]:
    a = rig.target.read_bytes()
    b = (rig.tmp / "local.img").read_bytes()
    rb = 128 * BS
    return [i for i in range(SIZE // rb) if a[i * rb:(i + 1) * rb] != b[i * rb:(i + 1) * rb]]


def test_long_overflow_keeps_remote_fresh_but_flags_it_inconsistent(rig: Rig) -> None:
    """The journal stays full (say another remote is down): rounds of dirty-region copies keep this
    remote current, but its target is reported inconsistent, with the pre-overflow image kept for a
    rollback, until the overflow ends and a final round closes the resync."""
    rng = random.Random(33)
    tuning = ReplicatorTuning(**{**FAST.__dict__, "overflow_resync_after_s": 0.0,
                                 "overflow_round_interval_s": 0.5})
    remote = rig.start_remote()
    rep = rig.start_rep(tuning=tuning)
    rig.wait_streaming()
    random_writes(rig.unit, 30, rng)
    rig.drain()
    rig.unit.overflow = True
    random_writes(rig.unit, 30, rng)
    wait_until(lambda: rig.same(), what="overflow rounds to bring the dirty regions across")
    src = remote.status()["sources"][0]
    assert (src["consistent"], src["rollback_available"]) == (False, True), (src, rep.status())
    wait_until(lambda: rep.status()["remotes"][0]["resync"]["open"] is True, what="round reported open")
    rig.unit.overflow = False
    random_writes(rig.unit, 10, rng)
    wait_until(lambda: remote.status()["sources"][0]["consistent"] is True, what="final round")
    wait_until(lambda: not rep.status()["remotes"][0]["resync"]["open"], what="source sees the round closed")
    rig.drain()
    assert rig.same()


def test_async_remote_gets_writes_gathered_into_few_batches(rig: Rig) -> None:
    """An async remote's link lets the records of a burst gather (`coalesce_s`) and sends them as
    a few BATCH frames, not one per host write; every write still lands, in order."""
    from dataclasses import replace

    rng = random.Random(6)
    rig.start_remote()
    rep = rig.start_rep(tuning=replace(FAST, coalesce_s=0.5))
    rig.wait_streaming()
    before = rep.status()["remotes"][0]["batches_sent"]
    for _ in range(40):
        count = rng.randint(1, 16)
        rig.unit.write(rng.randrange(0, rig.unit.num_blocks - count), rng.randbytes(count * BS))
    rig.drain()
    assert rig.same()
    assert rep.status()["remotes"][0]["batches_sent"] - before <= 10
