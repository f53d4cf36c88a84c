"""Cascade (issue 11 item 6): a remote relays a source to a further remote, on real unit processes.

local → r1 (`--forward ID=r2`) → r2: r2 absent does not hold up the local unit or r1; r2 killed with
SIGKILL and restarted in the middle of a write workload; at the end both targets equal the local volume
byte for byte. A relay refuses writes for its relayed source from anyone but its upstream. A promoted
relay forwards the standby host's writes, and after the failback the chain goes on in order.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from firmware.cli import build_parser
from firmware.config import REMOTE_OPTS, UsageError, merge_options, remote_options
from firmware.journal import RecordKind
from firmware.link import protocol as jp
from firmware.link_transport import LinkTransport
from firmware.pairing import TlsFiles, client_context
from host_tests.units import (
    KillAndRestart,
    Status,
    UnitError,
    UnitProcess,
    Units,
    drained,
    first_difference,
    free_port,
    streaming,
    usbmirror,
)
from host_tests.usbip_support import UsbipClient

BS = 512
SID = "site1"


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    with Units(tmp_path) as u:
        yield u


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`usbmirror pair DIR --remote r1 --remote r2 --source site1`, once for the module."""
    d = tmp_path_factory.mktemp("cascade") / "tls"
    r = usbmirror("pair", str(d), "--remote", "r1", "--remote", "r2", "--source", SID)
    assert r.returncode == 0, r.stderr
    return d


RETENTION = ["--forward-retention", "16M"]  # plenty for these workloads, quick to pre-write


def attach(unit: UnitProcess) -> UsbipClient:
    return attach_at(unit.port)


def attach_at(port: int) -> UsbipClient:
    c = UsbipClient("127.0.0.1", port)
    assert c.import_device("1-1").device is not None
    c.enumerate()
    c.until_ready()
    return c


def write_some(c: UsbipClient, rng: random.Random, n: int, blocks: int = 8) -> None:
    for _ in range(n):
        lba = rng.randrange(0, 32768 - blocks)
        assert c.write10(lba, rng.randbytes(blocks * BS)) == 0


@contextlib.contextmanager
def writing_in_background(local: UnitProcess, rng: random.Random) -> Iterator[None]:
    """Host writes through `local` on a thread for as long as the block runs; any error it met fails the test."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def workload() -> None:
        try:
            with attach(local) as c:
                while not stop.is_set():
                    write_some(c, rng, 20)
        except BaseException as exc:
            errors.append(exc)

    w = threading.Thread(target=workload, daemon=True)
    w.start()
    try:
        yield
    finally:
        stop.set()
        w.join(60)
    assert not errors, errors


def forward(st: Status) -> dict[str, object]:
    fwd: dict[str, object] = st["sources"][0]["forward"]
    return fwd


def next_hop_caught_up(r1: UnitProcess) -> Callable[[Status], bool]:
    """r1's next hop holds everything r1 applied: nothing relayed is left and nothing is dirty."""
    def pred(st: Status) -> bool:
        f = forward(st)
        return (f["state"] == "streaming" and f["lag_records"] == 0 and f["dirty_regions"] == 0
                and f["acked_seq"] == f["journal_head_seq"] and not st["sources"][0]["resync_percent"])
    return pred


def assert_equal(a: Path, b: Path, units: Units) -> None:
    diff = first_difference(a, b)
    assert diff is None, f"{b.name} differs from {a.name} at byte {diff}\n{units.describe()}"


def test_pair_makes_certificates_for_several_remotes(tls: Path) -> None:
    d = tls
    for name in ("ca.crt", "remote-r1.crt", "remote-r1.key", "remote-r2.crt", "remote-r2.key",
                 f"source-{SID}.crt", f"source-{SID}.key"):
        assert (d / name).is_file(), name
    r = usbmirror("pair", str(d), "--remote", "bad name!", "--source", SID)
    assert r.returncode != 0 and "unit id" in r.stderr


def test_cascade_with_the_last_hop_absent_then_killed_and_restarted(units: Units, tmp_path: Path, tls: Path) -> None:
    r2_port = free_port()
    r2_target, r1_target, volume = tmp_path / "r2.img", tmp_path / "r1.img", tmp_path / "volume.img"
    r1 = units.start_remote("r1", targets={SID: r1_target}, tls_dir=tls,
                            extra=["--forward", f"{SID}=127.0.0.1:{r2_port}", *RETENTION])
    local = units.start_local(volume=volume, size="16M", source_id=SID, tls_dir=tls, remotes=[r1.address])
    local.wait_status(streaming(), what="the link to r1")
    rng = random.Random(11)
    # r2 is absent: the local unit's writes and r1's apply go on without it
    with attach(local) as c:
        write_some(c, rng, 200)
    local.wait_status(drained, what="r1 to apply every write while r2 is absent")
    st = r1.status()
    f = forward(st)
    assert f["state"] != "streaming" and int(f["lag_records"]) > 0, f  # type: ignore[call-overload]
    assert f["address"] == f"127.0.0.1:{r2_port}" and f["upstream"] == f"source:{SID}"
    assert int(f["lag_bytes"]) >= 200 * 8 * BS and float(f["lag_seconds"]) > 0  # type: ignore[call-overload,arg-type]
    assert f"forward to 127.0.0.1:{r2_port}" in r1.status_raw(text=True).stdout
    assert st["sources"][0]["applied_seq"] == local.status()["journal"]["durable_seq"]

    # r2 comes up with nothing beyond --target; it is killed (SIGKILL) and restarted mid-workload
    r2 = units.start_remote("r2", targets={SID: r2_target}, tls_dir=tls, port=r2_port)
    r2.wait_status(lambda s: s["sources"][0]["applied_seq"] > 0, what="r2 to receive the relayed source")
    with writing_in_background(local, rng):
        seen = r2.status()["sources"][0]["applied_seq"]
        killer = KillAndRestart(r2, r2, lambda s: s["sources"][0]["applied_seq"] > seen + 50,
                                what="r2 to apply part of the workload")
        killer.start()
        killer.join(120)
        assert killer.error is None, f"{killer.error}\n{units.describe()}"
        assert r2.history == [-9]
        again = r2.wait_status(lambda s: s["sources"][0]["state"] == "connected",
                               what="the relay to reconnect")["sources"][0]["applied_seq"]
        r2.wait_status(lambda s: s["sources"][0]["applied_seq"] > again + 20, what="the workload to go on to r2")
    local.wait_status(drained, what="r1 to catch up")
    r1.wait_status(next_hop_caught_up(r1), what="r2 to catch up with r1", timeout=120)
    local.stop()
    r1.stop()
    r2.stop()
    assert_equal(volume, r1_target, units)
    assert_equal(volume, r2_target, units)
    assert "relay upstream recorded source=site1 upstream=source:site1" in r1.log()
    # the relay connects to r2 with its own certificate, not the source's
    r2_log = r2.log(tail=1 << 30)
    assert "cert=source:" not in r2_log, units.describe()
    assert re.search(r"source connected source=site1 \S+ cert=remote:r1 purpose=REPLICATE", r2_log), units.describe()


def test_a_relay_takes_writes_for_its_source_from_its_upstream_only(units: Units, tmp_path: Path, tls: Path) -> None:
    r1 = units.start_remote("r1", targets={SID: tmp_path / "r1.img"}, tls_dir=tls,
                            extra=["--forward", f"{SID}=127.0.0.1:{free_port()}", *RETENTION])
    local = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id=SID, tls_dir=tls,
                              remotes=[r1.address])
    local.wait_status(streaming(), what="the link to r1")
    with attach(local) as c:
        assert c.write10(0, b"\x11" * BS) == 0
    local.wait_status(drained, what="r1 to apply")
    local.stop()  # the upstream is gone; r2 (another remote of the same CA) tries to write site1
    ctx = client_context(TlsFiles.for_remote(tls, "r2"))
    host, port = r1.address.split(":")
    raw = socket.create_connection((host, int(port)), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname=None)
    assert isinstance(sock, ssl.SSLSocket)
    link = LinkTransport(sock, jp.Role.SOURCE, timeout=10)
    try:
        size = 16 << 20
        link.send(jp.Hello(SID, bytes(range(16)), size, BS, 1, 0, jp.Feature(0), jp.Purpose.REPLICATE))
        got: list[jp.Event] = []
        while not any(isinstance(e, jp.Error) for e in got):
            link.wait(10)
            got += link.read_events()
        # the records it goes on to send find the connection closed
        link.conn.state = jp.ConnState.OPEN
        with contextlib.suppress(OSError):
            link.send(jp.Batch(0, (jp.Record(1, RecordKind.WRITE, 0, 1, 1, b"\x66" * BS),)))
            link.wait(2)
            assert link.read_events() == []
    except (OSError, UnitError) as exc:
        raise AssertionError(f"no refusal: {exc}\n{units.describe()}") from exc
    finally:
        link.close()
    err = next(e for e in got if isinstance(e, jp.Error))
    assert err.code is jp.ErrorCode.PERMISSION_DENIED and "from source:site1 only" in err.message
    assert not any(isinstance(e, jp.HelloReply | jp.Ack) for e in got)
    log = r1.log()
    assert "refused source" in log and "code=PERMISSION_DENIED" in log and "not remote:r2" in log
    with open(tmp_path / "r1.img", "rb") as f:
        assert f.read(BS) == b"\x11" * BS  # nothing of the refused batch was written


def test_a_full_relay_journal_falls_back_to_a_dirty_region_resync(units: Units, tmp_path: Path, tls: Path) -> None:
    """r2 absent and more written than the relay keeps: r1 goes on applying (dirty regions instead of
    journal records) and brings r2 up to date by a dirty-region resync when it comes."""
    r2_port = free_port()
    r2_target, r1_target, volume = tmp_path / "r2.img", tmp_path / "r1.img", tmp_path / "volume.img"
    r1 = units.start_remote("r1", targets={SID: r1_target}, tls_dir=tls,
                            extra=["--forward", f"{SID}=127.0.0.1:{r2_port}", "--forward-retention", "1M"])
    local = units.start_local(volume=volume, size="16M", source_id=SID, tls_dir=tls, remotes=[r1.address])
    local.wait_status(streaming(), what="the link to r1")
    r2 = units.start_remote("r2", targets={SID: r2_target}, tls_dir=tls, port=r2_port)
    rng = random.Random(12)
    with attach(local) as c:
        write_some(c, rng, 10)
        r1.wait_status(next_hop_caught_up(r1), what="r2's initial copy")
        r2.stop()  # r2 goes away with a copy of its own
        write_some(c, rng, 100, blocks=64)  # 3.2 MiB through a 1 MiB relay journal
    local.wait_status(drained, what="r1 to apply every write while its relay journal is full")
    f = forward(r1.status())
    assert f["overflow"] is True and int(f["dirty_regions"]) > 0, f  # type: ignore[call-overload]
    assert "relay journal full: tracking dirty regions instead source=site1" in r1.log()
    r2.launch()
    r1.wait_status(next_hop_caught_up(r1), what="r2 to be brought up to date", timeout=120)
    assert forward(r1.status())["overflow"] is False
    rounds = re.findall(r"resync begins remote=\S+ reason=journal overflow position=\d+ regions=(\d+)", r1.log())
    assert any(int(n) > 0 for n in rounds), units.describe()
    local.stop()
    r1.stop()
    r2.stop()
    assert_equal(volume, r1_target, units)
    assert_equal(volume, r2_target, units)


def test_forward_options_are_checked_and_read_from_the_config(tmp_path: Path) -> None:
    def opts(argv: list[str], cfg: dict[str, object]) -> object:
        ns = build_parser().parse_args(["remote", *argv])
        return remote_options(merge_options(ns, REMOTE_OPTS, cfg, extra=("targets", "forwards")))

    base = ["--name", "r1", "--tls-dir", str(tmp_path)]
    o = opts(base, {"targets": {SID: "/srv/a.img"}, "forward": [f"{SID}=10.0.0.2:7373,name=r2"],
                    "forward_retention": "8M"})
    spec = o.forwards[SID]  # type: ignore[attr-defined]
    assert spec.host_port == ("10.0.0.2", 7373) and spec.name == "r2"
    assert o.forward_retention == 8 << 20  # type: ignore[attr-defined]
    o = opts([*base, "--target", f"{SID}=/srv/a.img", "--forward", f"{SID}=10.0.0.3:7000"], {})
    assert o.forwards[SID].host_port == ("10.0.0.3", 7000)  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match="no --target other=PATH"):
        opts([*base, "--target", f"{SID}=/srv/a.img", "--forward", "other=10.0.0.3:7000"], {})
    with pytest.raises(UsageError, match="expects ID=HOST:PORT"):
        opts([*base, "--target", f"{SID}=/srv/a.img", "--forward", "10.0.0.3:7000"], {})
    with pytest.raises(UsageError, match="asynchronously"):
        opts([*base, "--target", f"{SID}=/srv/a.img", "--forward", f"{SID}=10.0.0.3:7000,mode=sync"], {})


def test_the_relay_killed_in_the_middle_relays_every_record_once_more_at_most(units: Units, tmp_path: Path,
                                                                               tls: Path) -> None:
    """r1 (the relay) SIGKILLed and restarted mid-workload: the upstream sends again what r1 had not
    made durable; the relay journal already held some of it; both copies end equal to the volume."""
    r2_target, r1_target, volume = tmp_path / "r2.img", tmp_path / "r1.img", tmp_path / "volume.img"
    r2 = units.start_remote("r2", targets={SID: r2_target}, tls_dir=tls)
    r1 = units.start_remote("r1", targets={SID: r1_target}, tls_dir=tls,
                            extra=["--forward", f"{SID}={r2.address}", *RETENTION])
    local = units.start_local(volume=volume, size="16M", source_id=SID, tls_dir=tls, remotes=[r1.address])
    local.wait_status(streaming(), what="the link to r1")
    rng = random.Random(13)
    with writing_in_background(local, rng):
        killer = KillAndRestart(r2, r1, lambda s: s["sources"][0]["applied_seq"] > 100,
                                what="r2 to apply part of the workload")
        killer.start()
        killer.join(120)
        assert killer.error is None, f"{killer.error}\n{units.describe()}"
        again = r2.wait_status(lambda s: s["sources"][0]["state"] == "connected",
                               what="the relay to come back")["sources"][0]["applied_seq"]
        r2.wait_status(lambda s: s["sources"][0]["applied_seq"] > again + 50, what="the workload to go on to r2")
    local.wait_status(drained, what="r1 to catch up")
    r1.wait_status(next_hop_caught_up(r1), what="r2 to catch up with r1", timeout=120)
    local.stop()
    r1.stop()
    r2.stop()
    assert_equal(volume, r1_target, units)
    assert_equal(volume, r2_target, units)


def test_metrics_show_the_next_hops_lag() -> None:
    from firmware.metrics import StatusCollector

    st = {"role": "remote", "sources": [{"source_id": SID, "applied_seq": 9, "forward": {
        "state": "disconnected", "lag_bytes": 4096, "lag_records": 3, "lag_seconds": 1.5, "dirty_regions": 0}}]}
    got = {(f.name, smp.labels.get("source")): smp.value for f in StatusCollector(lambda: st).collect()
           for smp in f.samples}
    assert got[("usbmirror_forward_lag_bytes", SID)] == 4096
    assert got[("usbmirror_forward_lag_records", SID)] == 3
    assert got[("usbmirror_forward_lag_seconds", SID)] == 1.5
    assert got[("usbmirror_forward_link_up", SID)] == 0.0


def test_a_promoted_relay_forwards_the_standby_hosts_writes_and_the_chain_resumes_after_failback(
        units: Units, tmp_path: Path, tls: Path) -> None:
    """local → r1 → r2; the local unit dies and r1 is promoted: what the standby host writes to r1
    reaches r2 as well (also across a SIGKILL of r1 while promoted), so the third copy holds the
    promoted data; after the failback the local unit's writes go on through r1 to r2, and all three
    copies end equal."""
    r2_target, r1_target, volume = tmp_path / "r2.img", tmp_path / "r1.img", tmp_path / "volume.img"
    r2 = units.start_remote("r2", targets={SID: r2_target}, tls_dir=tls)
    r1 = units.start_remote("r1", targets={SID: r1_target}, tls_dir=tls,
                            extra=["--forward", f"{SID}={r2.address}", *RETENTION])
    local = units.start_local(volume=volume, size="16M", source_id=SID, tls_dir=tls, remotes=[r1.address])
    local.wait_status(streaming(), what="the link to r1")
    rng = random.Random(14)
    with attach(local) as c:
        write_some(c, rng, 50)
    local.wait_status(drained, what="r1 to apply")
    r1.wait_status(next_hop_caught_up(r1), what="r2 to catch up with r1")
    local.kill9()
    r1.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")

    standby_port = free_port()
    pr = usbmirror("promote", "--state-dir", str(r1.state_dir), "--source", SID, "--usbip",
                   f"127.0.0.1:{standby_port}")
    assert pr.returncode == 0, pr.stderr + units.describe()
    with attach_at(standby_port) as standby:
        write_some(standby, rng, 40)
    st = r1.wait_status(next_hop_caught_up(r1), what="r2 to take the standby host's writes", timeout=120)
    f = forward(st)
    assert st["sources"][0]["primary"] is True and f["promoted"] is True, f
    assert_equal(r1_target, r2_target, units)  # the promoted copy is kept on r2 too

    # r1 dies while promoted; it serves the copy again and goes on forwarding what the standby writes
    r1.kill9()
    r1.launch()
    r1.wait_status(lambda s: s["sources"][0].get("served", {}).get("bus") == "usbip",
                   what="the promoted copy to be served again")
    with attach_at(standby_port) as standby:
        write_some(standby, rng, 40, blocks=16)
    r1.wait_status(next_hop_caught_up(r1), what="r2 to take the writes after r1's restart", timeout=120)
    assert_equal(r1_target, r2_target, units)

    again = units.start_local(volume=volume, size="16M", source_id=SID, tls_dir=tls, remotes=[r1.address],
                              state_dir=local.state_dir)
    again.wait_status(lambda s: s["host_writes"] == "refused", what="the old primary to become a replica")
    fb = usbmirror("failback", "--state-dir", str(r1.state_dir), "--source", SID, "--timeout", "120", timeout=180)
    assert fb.returncode == 0, fb.stderr + units.describe()
    again.wait_status(lambda s: s["host_writes"] == "accepted", what="the local unit to serve writes again")
    again.wait_status(streaming(), what="replication to r1 to resume")
    with attach(again) as c:
        write_some(c, rng, 50)
    again.wait_status(drained, what="r1 to apply the writes after the failback")
    st = r1.wait_status(next_hop_caught_up(r1), what="r2 to take the writes after the failback", timeout=120)
    assert forward(st)["promoted"] is False and st["sources"][0]["primary"] is False
    again.stop()
    r1.stop()
    r2.stop()
    assert_equal(volume, r1_target, units)
    assert_equal(volume, r2_target, units)
    assert "relay follows its upstream again source=site1" in r1.log()


def test_a_split_brain_on_a_relay_resolved_keep_local_reaches_the_next_hop(units: Units, tmp_path: Path,
                                                                          tls: Path) -> None:
    """r1 (relaying to r2) is promoted while the local unit still writes (a partition): r2 gets the
    standby's writes; `resolve --keep local` on r1 discards them, the local unit resyncs r1 and r1
    passes the regions that changed on to r2, so all three copies end equal to the local volume."""
    r2_target, r1_target, volume = tmp_path / "r2.img", tmp_path / "r1.img", tmp_path / "volume.img"
    r2 = units.start_remote("r2", targets={SID: r2_target}, tls_dir=tls)
    fwd = ["--forward", f"{SID}={r2.address}", *RETENTION]
    r1 = units.start_remote("r1", targets={SID: r1_target}, tls_dir=tls, extra=fwd)
    local = units.start_local(volume=volume, size="16M", source_id=SID, tls_dir=tls, remotes=[r1.address])
    local.wait_status(streaming(), what="the link to r1")
    rng = random.Random(15)
    with attach(local) as c:
        write_some(c, rng, 30)
    local.wait_status(drained, what="r1 to apply")
    r1.stop()
    # a partition: r1 comes back where the local unit cannot reach it, and is promoted
    r1 = units.start_remote("r1", targets={SID: r1_target}, tls_dir=tls, state_dir=r1.state_dir, extra=fwd)
    standby_port = free_port()
    assert usbmirror("promote", "--state-dir", str(r1.state_dir), "--source", SID, "--usbip",
                     f"127.0.0.1:{standby_port}").returncode == 0
    with attach(local) as c:
        write_some(c, rng, 10)
    with attach_at(standby_port) as standby:
        write_some(standby, rng, 10)
    r1.wait_status(next_hop_caught_up(r1), what="r2 to take the standby host's writes")
    assert_equal(r1_target, r2_target, units)
    local.stop()
    again = units.start_local(volume=volume, size="16M", source_id=SID, tls_dir=tls, remotes=[r1.address],
                              state_dir=local.state_dir)
    r1.wait_status(lambda s: s["sources"][0]["split_brain"] is True, timeout=90, what="r1 to see the split brain")
    r = usbmirror("resolve", "--state-dir", str(r1.state_dir), "--source", SID, "--keep", "local")
    assert r.returncode == 0, r.stderr
    again.wait_status(lambda s: s["split_brain"] is False and s["remotes"][0]["state"] == "streaming" and drained(s),
                      timeout=120, what="r1 to be resynced from the local unit")
    st = r1.wait_status(next_hop_caught_up(r1), what="r2 to take what the resync changed", timeout=120)
    assert forward(st)["promoted"] is False
    again.stop()
    r1.stop()
    r2.stop()
    assert_equal(volume, r1_target, units)
    assert_equal(volume, r2_target, units)
