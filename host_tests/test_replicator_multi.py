"""One source mirroring to several remotes (async and sync together), a remote that is down not
holding up the other, verify reporting an unreachable remote, the bandwidth cap's token bucket, and
the progress callback that drives the CLI's rich bar."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.pairing import TlsFiles, pair
from firmware.progress_bars import RichProgress
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
from firmware.replicator import (
    Progress,
    RemoteSpec,
    Replicator,
    ReplicatorTuning,
    _TokenBucket,
)
from firmware.volume import Volume
from host_tests.linkkit import FakeJournal, FakeLocalUnit, wait_until
from host_tests.test_replicator_e2e import FAST, random_writes

BS = 512
SIZE = 2 << 20


class Two:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        pair(tmp / "tls", "ra", ["src"])
        pair(tmp / "tls", "rb", [])
        self.vol = Volume(tmp / "local.img", size=SIZE, block_size=BS, write_cache=True)
        self.journal = FakeJournal()
        self.unit = FakeLocalUnit(self.vol, self.journal)
        self.remotes: dict[str, RemoteUnit] = {}
        self.rep: Replicator | None = None

    def remote(self, name: str, port: int = 0) -> RemoteUnit:
        ru = RemoteUnit(RemoteUnitConfig(("127.0.0.1", port), name, {"src": str(self.tmp / f"{name}.img")},
                                         str(self.tmp / "tls"), str(self.tmp / f"state-{name}")))
        ru.start()
        self.remotes[name] = ru
        return ru

    def close(self) -> None:
        if self.rep:
            self.rep.close()
        for r in self.remotes.values():
            r.stop()
        self.vol.close()

    def same(self, name: str) -> bool:
        return (self.tmp / f"{name}.img").read_bytes() == (self.tmp / "local.img").read_bytes()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Two]:
    t = Two(tmp_path)
    yield t
    t.close()


def test_two_remotes_async_and_sync(two: Two) -> None:
    rng = random.Random(50)
    a, b = two.remote("ra"), two.remote("rb")
    events: list[Progress] = []
    rep = Replicator(two.unit, two.journal, source_id="src",
                     remotes=[RemoteSpec(("127.0.0.1", a.port), "async", "ra"),
                              RemoteSpec(f"127.0.0.1:{b.port}", "sync", "rb", bandwidth_limit_bps=50_000_000)],
                     tls=TlsFiles.for_source(two.tmp / "tls", "src"), tuning=FAST, progress=events.append)
    two.rep = rep
    rep.start()
    wait_until(lambda: all(ln.state.name == "STREAMING" for ln in rep.links), what="both links up")
    random_writes(two.unit, 100, rng)
    # the sync remote has every write the host was answered for
    assert rep.links[1].acked_seq == two.journal.head_seq
    assert rep.wait_drained(60)
    assert two.same("ra") and two.same("rb")
    st = rep.status()["remotes"]
    assert [r["mode"] for r in st] == ["async", "sync"]
    assert st[1]["bandwidth_limit_bps"] == 50_000_000
    assert {e.remote for e in events} == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert all(e.phase == "resync" for e in events) and events[-1].done == events[-1].total
    report = rep.verify()
    assert report["match"] and [r["match"] for r in report["remotes"]] == [True, True]


def test_one_remote_down_does_not_hold_up_the_other(two: Two) -> None:
    rng = random.Random(51)
    a = two.remote("ra")
    b = two.remote("rb")
    b_port = b.port
    b.stop()
    del two.remotes["rb"]
    rep = Replicator(two.unit, two.journal, source_id="src",
                     remotes=[RemoteSpec(("127.0.0.1", a.port), "async", "ra"),
                              RemoteSpec(("127.0.0.1", b_port), "async", "rb")],
                     tls=TlsFiles.for_source(two.tmp / "tls", "src"),
                     tuning=ReplicatorTuning(**{**FAST.__dict__, "drain_timeout_s": 1.0}))
    two.rep = rep
    rep.start()
    random_writes(two.unit, 60, rng)
    wait_until(lambda: rep.links[0].acked_seq == two.journal.head_seq, what="the live remote caught up")
    assert two.same("ra")
    assert rep.links[1].state.name in ("CONNECTING", "DISCONNECTED") and rep.links[1].last_error
    # the journal keeps what the absent remote lacks
    assert two.journal.consumers()["remote:rb"] < two.journal.head_seq
    report = rep.verify()
    assert not report["match"]
    down = report["remotes"][1]
    assert not down["match"] and "error" in down and not down["drained"]
    # it comes back and catches up
    two.remote("rb", port=b_port)
    assert rep.wait_drained(60)
    assert two.same("rb")


def test_token_bucket_paces_to_the_rate() -> None:
    tb = _TokenBucket(1_000_000)
    tb.stamp = 100.0
    tb.tokens = tb.burst
    assert tb.wait_time(100.0) == 0.0
    tb.spend(int(tb.burst) + 500_000)
    assert tb.wait_time(100.0) == pytest.approx(0.5)
    assert tb.wait_time(100.25) == pytest.approx(0.25)
    assert tb.wait_time(100.5) == 0.0 or tb.wait_time(100.5) < 1e-9


def test_rich_progress_callback_draws_bars() -> None:
    with RichProgress() as bar:
        bar(Progress("10.0.0.2:7420", "resync", 5, 10, 1 << 20))
        bar(Progress("10.0.0.2:7420", "resync", 10, 10, 2 << 20))
        bar(Progress("10.0.0.3:7420", "verify", 1, 4, 0))
        tasks = {t.description: t for t in bar._progress.tasks}
    assert tasks["resync 10.0.0.2:7420"].completed == 10 and tasks["resync 10.0.0.2:7420"].finished
    assert tasks["verify 10.0.0.3:7420"].completed == 1
