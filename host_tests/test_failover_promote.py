"""`usbmirror promote` on a running remote unit (in process): refused while the source is connected
and healthy; otherwise a new data generation recorded before anything is served, the copy served
read-write over USB/IP with every write in the target, the bitmap and the history; rolled back to a
point of the history first when asked (also when that is interrupted); primary across a restart,
answering the old source's HELLO with its generations and a refusal."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from firmware import promotion
from firmware.failover.generations import History
from firmware.failover_serve import PromotionServers
from firmware.history_cli import run_restore
from firmware.journal import JournalError
from firmware.link import protocol as jp
from firmware.relay import ForwardSpec
from firmware.remote_unit import PromoteError, RemoteUnit, RemoteUnitConfig
from firmware.replication.spec import RemoteSpec
from firmware.replicator import ReplicatorTuning
from host_tests.test_history_restore import Scenario, _remote, rec
from host_tests.test_remote_unit import BS, SIZE, UUID
from host_tests.usbip_support import UA_RESET, UsbipClient

SOURCE_GENS = ((0x1234, 1, 1_000, 0),)


class GenSource:
    """A source that offers GENERATIONS and sends its history after HELLO (like the replicator)."""

    def __init__(self, port: int, gens: tuple[tuple[int, int, int, int], ...] = SOURCE_GENS) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = jp.JourneyConnection(jp.Role.SOURCE)
        self.sock.sendall(self.conn.send(jp.Hello("s1", UUID, SIZE, BS, 1, 0,
                                                  jp.Feature.LZ4 | jp.Feature.GENERATIONS)))
        self.sock.sendall(self.conn.send(jp.Generations(gens, jp.GenerationsFlag.PRIMARY)))

    def recv(self) -> jp.Event:
        while True:
            ev = self.conn.next_event()
            if not isinstance(ev, jp.NeedData):
                return ev
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("closed")
            self.conn.receive_data(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sc(tmp_path: Path) -> Iterator[Scenario]:
    with _remote(tmp_path) as ru:
        s = Scenario(ru)
        yield s
        s.src.close()


def _disconnect(sc: Scenario) -> None:
    sc.src.close()
    t = sc.ru.targets["s1"]
    deadline = time.monotonic() + 10
    while t.active is not None:
        assert time.monotonic() < deadline, "the remote did not notice the source left"
        time.sleep(0.02)


def _client(port: int) -> UsbipClient:
    c = UsbipClient("127.0.0.1", port)
    assert c.import_device("1-1").status == 0
    c.enumerate()
    assert c.until_ready() == [UA_RESET]
    return c


def _roles(sc: Scenario) -> dict[str, object]:
    return json.loads((Path(sc.state) / "roles" / "s1.json").read_text())  # type: ignore[no-any-return]


def test_promote_is_refused_while_the_source_is_connected_and_healthy(sc: Scenario) -> None:
    with PromotionServers(sc.ru) as servers, pytest.raises(PromoteError, match="connected and healthy"):
        servers.promote({"source": "s1", "usbip": "127.0.0.1:0"})
    st = sc.ru.targets["s1"].status()
    assert st["primary"] is False and st["state"] == "connected"
    assert _roles(sc)["primary"] is False


def test_replica_adopts_the_source_generations(sc: Scenario) -> None:
    _disconnect(sc)
    src = GenSource(sc.ru.port)
    reply = src.recv()
    assert isinstance(reply, jp.HelloReply) and reply.applied_seq == 6
    src.sock.sendall(src.conn.send(jp.Heartbeat(7)))  # echoed after the remote handled GENERATIONS
    assert src.recv() == jp.Heartbeat(7)
    src.close()
    assert History.from_tuples(SOURCE_GENS) == sc.ru.targets["s1"].roles.state.history
    assert sc.ru.targets["s1"].status()["data_generation"] == "1:0000000000001234"


def test_promote_serves_the_copy_read_write_and_refuses_the_old_source(sc: Scenario, tmp_path: Path) -> None:
    _disconnect(sc)
    with PromotionServers(sc.ru) as servers:
        res = servers.promote({"source": "s1", "usbip": "127.0.0.1:0"})
        assert res["fork_seq"] == 6 and res["point"] == "the newest image (seq 6)"
        assert "applied up to seq 6" in res["warning"] and "failover's loss" in res["warning"]
        roles = _roles(sc)
        assert roles["primary"] is True and len(roles["history"]) == 1  # type: ignore[arg-type]
        assert roles["history"][0]["fork_seq"] == 6  # type: ignore[index]
        port = int(str(res["usbip"]).rsplit(":", 1)[1])
        with _client(port) as c:
            assert c.read_capacity() == (SIZE // BS, BS)
            assert c.read10(0, 8) == sc.images[6][:8 * BS]
            assert c.write10(100, b"\x77" * (4 * BS)) == 0
            assert c.read10(100, 4) == b"\x77" * (4 * BS)
        target = sc.target.read_bytes()
        assert target[100 * BS:104 * BS] == b"\x77" * (4 * BS)
        st = sc.ru.targets["s1"].status()
        assert st["primary"] is True and st["state"] == "primary"
        assert st["promoted_io"]["writes"] == 1 and st["promoted_io"]["dirty_regions"] == 1
        # the history stays true: the image at seq 6 is still the one from before the standby's write
        r = run_restore(sc.state, "s1", str(tmp_path / "at6.img"), seq=6)
        assert r.seq == 6 and (tmp_path / "at6.img").read_bytes() == sc.images[6]
        # the old source is refused, with the remote's generations first
        old = GenSource(sc.ru.port)
        gens = old.recv()
        assert isinstance(gens, jp.Generations) and jp.GenerationsFlag.PRIMARY in gens.flags
        assert History.from_tuples(gens.generations).current is not None
        err = old.recv()
        assert isinstance(err, jp.Error) and err.code is jp.ErrorCode.PRIMARY
        assert "is primary for source s1 now" in err.message
        old.close()
        with pytest.raises(PromoteError, match="already primary"):
            servers.promote({"source": "s1", "usbip": "127.0.0.1:0"})
    assert sc.target.read_bytes() == target


def test_a_promoted_remote_stays_primary_and_serves_again_after_a_restart(sc: Scenario) -> None:
    _disconnect(sc)
    with PromotionServers(sc.ru) as servers:
        res = servers.promote({"source": "s1", "usbip": "127.0.0.1:0"})
        port = int(str(res["usbip"]).rsplit(":", 1)[1])
        with _client(port) as c:
            assert c.write10(5, b"\x42" * BS) == 0
    sc.ru.stop()
    ru = RemoteUnit(sc.ru.cfg)
    ru.start()
    try:
        with PromotionServers(ru) as servers:
            servers.resume_all()
            st = ru.targets["s1"].status()
            assert st["primary"] is True and st["promotion"]["usbip"] == f"127.0.0.1:{port}"
            with _client(port) as c:
                assert c.read10(5, 1) == b"\x42" * BS
                assert c.write10(6, b"\x43" * BS) == 0
            old = GenSource(ru.port)
            assert isinstance(old.recv(), jp.Generations)
            err = old.recv()
            assert isinstance(err, jp.Error) and err.code is jp.ErrorCode.PRIMARY
            old.close()
        assert ru.targets["s1"].roles.bitmap_path("s1").exists()
    finally:
        ru.stop()
    assert sc.target.read_bytes()[5 * BS:7 * BS] == b"\x42" * BS + b"\x43" * BS


def test_promote_at_a_mark_rolls_the_target_back_and_keeps_the_history_true(sc: Scenario, tmp_path: Path) -> None:
    _disconnect(sc)
    with PromotionServers(sc.ru) as servers:
        res = servers.promote({"source": "s1", "usbip": "127.0.0.1:0", "mark": "good"})
        assert res["fork_seq"] == 2 and "mark 'good' (seq 2)" in res["point"]
        assert "rolled back to mark 'good' (seq 2), discarding the writes after it" in res["warning"]
        assert sc.target.read_bytes() == sc.images[2]
        port = int(str(res["usbip"]).rsplit(":", 1)[1])
        with _client(port) as c:
            assert c.read10(0, 16) == sc.images[2][:16 * BS]
        promo = _roles(sc)["promotion"]
        assert promo["rollback_to_seq"] is None and promo["rolled_back_blocks"] > 0  # type: ignore[index]
    # every point before the rollback can still be restored as it was
    for s in (4, 6):
        run_restore(sc.state, "s1", str(tmp_path / f"p{s}.img"), seq=s)
        assert (tmp_path / f"p{s}.img").read_bytes() == sc.images[s]


def test_an_interrupted_rollback_is_finished_when_the_remote_restarts(sc: Scenario, monkeypatch: pytest.MonkeyPatch
                                                                       ) -> None:
    _disconnect(sc)
    monkeypatch.setattr(promotion, "ROLLBACK_BATCH", 1)
    monkeypatch.setattr(promotion, "ROLLBACK_RECORD_BLOCKS_BYTES", 8 * BS)
    store = sc.ru.targets["s1"].store
    real = store.apply
    calls = [0]

    def cut(records: object) -> None:
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(5, "Input/output error")
        real(records)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "apply", cut)
    with PromotionServers(sc.ru) as servers, pytest.raises(PromoteError, match="rolling the target"):
        servers.promote({"source": "s1", "usbip": "127.0.0.1:0", "seq": 4})
    assert sc.target.read_bytes() not in (sc.images[4], sc.images[6])  # half way
    roles = _roles(sc)
    assert roles["primary"] is True and roles["promotion"]["rollback_to_seq"] == 4  # type: ignore[index]
    st = sc.ru.targets["s1"].status()
    assert st["primary"] is True and "rolling the target" in st["promotion_error"]
    monkeypatch.setattr(store, "apply", real)
    sc.ru.stop()
    ru = RemoteUnit(sc.ru.cfg)
    ru.start()
    try:
        with PromotionServers(ru) as servers:
            servers.resume_all()
            assert ru.targets["s1"].promoted is not None
            assert sc.target.read_bytes() == sc.images[4]
            assert "promotion_error" not in ru.targets["s1"].status()
    finally:
        ru.stop()


def test_promote_refusals_are_precise(sc: Scenario, tmp_path: Path) -> None:
    _disconnect(sc)
    with PromotionServers(sc.ru) as servers:
        with pytest.raises(PromoteError, match="unknown source 's9'"):
            servers.promote({"source": "s9", "usbip": "127.0.0.1:0"})
        with pytest.raises(PromoteError, match="no mark 'nope'"):
            servers.promote({"source": "s1", "usbip": "127.0.0.1:0", "mark": "nope"})
        with pytest.raises(PromoteError, match="expected HOST:PORT"):
            servers.promote({"source": "s1", "usbip": "nowhere"})
    assert _roles(sc)["primary"] is False


def test_a_target_that_never_held_a_copy_cannot_be_promoted(tmp_path: Path) -> None:
    with _remote(tmp_path) as ru, PromotionServers(ru) as servers, \
            pytest.raises(PromoteError, match="holds no copy of source s1 yet"):
        servers.promote({"source": "s1", "usbip": "127.0.0.1:0"})


def test_an_incomplete_resync_needs_force_and_promotes_the_image_from_before_it(sc: Scenario) -> None:
    sc.src.send(jp.ResyncBegin(6, 64, 32))
    sc.src.send(jp.RegionData(0, b"\xee" * (64 * BS)))
    sc.src.send(jp.Heartbeat(3))
    assert sc.src.recv() == jp.Heartbeat(3)
    _disconnect(sc)
    assert sc.target.read_bytes() != sc.images[6]
    with PromotionServers(sc.ru) as servers:
        with pytest.raises(PromoteError, match="--force rolls it back"):
            servers.promote({"source": "s1", "usbip": "127.0.0.1:0"})
        res = servers.promote({"source": "s1", "usbip": "127.0.0.1:0", "force": True})
        assert res["fork_seq"] == 6
        assert sc.target.read_bytes() == sc.images[6]


def _until(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_relay_promoted_after_an_incomplete_resync_gives_its_next_hop_the_image_it_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """r1 relays s1 to r2 and is in the middle of a resync whose data r2 already has; promoted with
    --force, r1 rolls its target back from the undo log (not a record) and r2 gets those blocks back
    too, then the standby host's writes, also one the relay journal fails to keep."""
    r2cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r2", targets={"s1": str(tmp_path / "r2.img")},
                             tls_dir=None, state_dir=str(tmp_path / "r2state"))
    with RemoteUnit(r2cfg) as r2:
        fwd = ForwardSpec("s1", RemoteSpec(("127.0.0.1", r2.port)), retention=1 << 20)
        r1cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r1", targets={"s1": str(tmp_path / "t.img")},
                                 tls_dir=None, state_dir=str(tmp_path / "state"), history_size=16 << 20,
                                 forwards={"s1": fwd},
                                 forward_tuning=ReplicatorTuning(backoff_initial_s=0.05, backoff_max_s=0.2))
        with RemoteUnit(r1cfg) as r1:
            sc = Scenario(r1)
            r1_target, r2_target = sc.target, tmp_path / "r2.img"
            _until(lambda: r2_target.exists() and r2_target.read_bytes() == sc.images[6], "r2 to hold seq 6")
            # a resync that copies region 0, then a record after it; it ends at 8, which never comes
            sc.src.send(jp.ResyncBegin(6, 64, 32))
            sc.src.send(jp.RegionData(0, b"\xee" * (64 * BS)))
            sc.src.send(jp.ResyncEnd(8))
            sc.src.send(jp.Batch(6, (rec(7, 900, 0x77, 4),)))
            sc.src.ack_upto(7)
            _until(lambda: r2_target.read_bytes() == r1_target.read_bytes(), "r2 to take the resync's data")
            assert r2_target.read_bytes()[: 64 * BS] == b"\xee" * (64 * BS)
            _disconnect(sc)
            with PromotionServers(r1) as servers:
                servers.promote({"source": "s1", "usbip": "127.0.0.1:0", "force": True})
                assert r1_target.read_bytes() == sc.images[6]
                _until(lambda: r2_target.read_bytes() == sc.images[6], "r2 to get the rolled-back blocks")
                t = r1.targets["s1"]
                assert t.promoted is not None and t.status()["forward"]["promoted"] is True
                t.promoted.write(100, b"\x5c" * (8 * BS))
                _until(lambda: r2_target.read_bytes() == r1_target.read_bytes(), "r2 to take the standby's write")
                # the relay journal's flash fails: the write still lands, its region goes to r2 as dirty
                relay = t.relay
                assert relay is not None and relay.journal is not None

                def failed_sync() -> int:
                    raise JournalError("injected: the relay journal's flash failed")

                monkeypatch.setattr(relay.journal, "sync", failed_sync)
                t.promoted.write(300, b"\x6d" * (4 * BS))
                assert r1_target.read_bytes()[300 * BS : 304 * BS] == b"\x6d" * (4 * BS)
                _until(lambda: r2_target.read_bytes() == r1_target.read_bytes(), "r2 to get the dirty region")
            sc.src.close()


class FetchSource(GenSource):
    """The old local unit pulling from a remote that hands the source back (a FETCH connection)."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = jp.JourneyConnection(jp.Role.SOURCE)
        self.sock.sendall(self.conn.send(jp.Hello("s1", UUID, SIZE, BS, 1, 0, jp.Feature.NONE, jp.Purpose.FETCH)))

    def send(self, ev: jp.Event) -> None:
        self.sock.sendall(self.conn.send(ev))


def test_failback_on_the_remote_side_hands_the_source_back_once(sc: Scenario) -> None:
    _disconnect(sc)
    servers = PromotionServers(sc.ru)
    res = servers.promote({"source": "s1", "usbip": "127.0.0.1:0"})
    port = int(str(res["usbip"]).rsplit(":", 1)[1])
    with _client(port) as c:
        assert c.write10(77, b"\x99" * BS) == 0
    # before `failback`, a FETCH is a replica's catch-up: it reads the served copy, and hands nothing back
    early = FetchSource(sc.ru.port)
    assert isinstance(early.recv(), jp.HelloReply)
    early.send(jp.RegionRead(77, 1))
    assert early.recv() == jp.RegionData(77, b"\x99" * BS)
    early_hist = sc.ru.targets["s1"].roles.state.history
    early.send(jp.Generations(early_hist.promote(gen_id=0x555, now_ns=1, fork_seq=7).as_tuples(),
                              jp.GenerationsFlag.PRIMARY))
    err = early.recv()
    assert isinstance(err, jp.Error) and "only a failback (`usbmirror failback`) hands the source back" in err.message
    early.close()
    early = FetchSource(sc.ru.port)  # nor does it write the copy
    assert isinstance(early.recv(), jp.HelloReply)
    early.send(jp.ResyncBegin(0, 2048, SIZE // (2048 * BS)))
    err = early.recv()
    assert isinstance(err, jp.Error) and "on a catch-up: it only reads the promoted copy" in err.message
    early.close()
    assert sc.ru.targets["s1"].status()["primary"] is True
    with _client(port) as c:  # the standby host still has its disk
        assert c.read10(77, 1) == b"\x99" * BS
    out = servers.failback({"source": "s1", "timeout": 0})
    assert out["done"] is False and out["promoted_io"]["writes"] == 1
    with pytest.raises(OSError):
        UsbipClient("127.0.0.1", port, timeout=2).import_device("1-1")  # the standby host lost the disk
    t = sc.ru.targets["s1"]
    assert t.status()["primary"] is True and t.roles.state.promotion["handover"] is True  # type: ignore[index]
    old = GenSource(sc.ru.port)
    gens = old.recv()
    assert isinstance(gens, jp.Generations) and jp.GenerationsFlag.HANDOVER in gens.flags
    assert isinstance(old.recv(), jp.Error)
    old.close()
    remote_hist = History.from_tuples(gens.generations)
    # the pull: digests, then blocks
    f = FetchSource(sc.ru.port)
    assert isinstance(f.recv(), jp.HelloReply)
    f.send(jp.RegionRead(77, 1))
    assert f.recv() == jp.RegionData(77, b"\x99" * BS)
    f.send(jp.DigestRequest(0, 1, 2048))
    d = f.recv()
    assert isinstance(d, jp.RegionDigests) and d.digests == (jp.region_digest(sc.target.read_bytes()),)
    # a generation that does not follow the remote's is refused
    bogus = remote_hist.promote(gen_id=0x777, now_ns=1, fork_seq=9).promote(gen_id=0x778, now_ns=2, fork_seq=9)
    f.send(jp.Generations(bogus.as_tuples(), jp.GenerationsFlag.PRIMARY))
    assert isinstance(e := f.recv(), jp.Error) and "does not follow" in e.message
    f.close()
    taken = remote_hist.promote(gen_id=0x999, now_ns=3, fork_seq=42)
    f2 = FetchSource(sc.ru.port)
    assert isinstance(f2.recv(), jp.HelloReply)
    f2.send(jp.Generations(taken.as_tuples(), jp.GenerationsFlag.PRIMARY))
    assert f2.recv() == jp.Ack(42)
    f2.close()
    st = t.status()
    assert st["primary"] is False and st["applied_seq"] == 42 and "promotion" not in st
    assert not t.roles.bitmap_path("s1").exists()
    assert not (Path(sc.state) / "s1.history").exists()  # the promoted copy's seqs end with it
    again = FetchSource(sc.ru.port)  # only once
    assert isinstance(again.recv(), jp.Error)
    again.close()
    servers.close()
    sc.ru.stop()
    ru = RemoteUnit(sc.ru.cfg)
    ru.start()
    try:
        src = GenSource(ru.port, taken.as_tuples())
        reply = src.recv()
        assert isinstance(reply, jp.HelloReply) and reply.applied_seq == 42
        src.close()
        assert ru.targets["s1"].status()["primary"] is False
    finally:
        ru.stop()
