"""Roles as an operator sees them on real `usbmirror local` / `usbmirror remote` processes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_tests.units import Status, UnitProcess, Units, drained, free_port, streaming, usbmirror
from host_tests.usbip_support import UsbipClient

BS = 512


def attach(unit: object) -> UsbipClient:
    c = UsbipClient("127.0.0.1", unit.port)  # type: ignore[attr-defined]
    assert c.import_device("1-1").device is not None
    c.enumerate()
    c.until_ready()
    return c


def read_block(path: Path, lba: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(lba * BS)
        return f.read(BS)


def resynced(st: Status) -> bool:
    """Every remote has the data: streaming (so a resync's regions are durable there) and drained. A
    link that has not reached its remote yet may show a position taken over from the journal."""
    return drained(st) and streaming()(st)


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    with Units(tmp_path) as u:
        yield u



def restart_as_replica_and_fail_back(units: Units, local: UnitProcess, remote: UnitProcess, volume: Path,
                                     tls: Path, *, catch_up_interval: str
                                     ) -> tuple[UnitProcess, subprocess.CompletedProcess[str]]:
    """The old primary restarts on its state (it must come back as a replica), then `usbmirror failback`
    runs on the promoted remote and succeeds; returns the restarted unit and the failback's result.
    `catch_up_interval` is its --catch-up-interval: "0" when the test counts what the failback itself
    pulls (no catch-up has pulled it before)."""
    again = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address],
                              state_dir=local.state_dir, extra=["--catch-up-interval", catch_up_interval])
    again.wait_status(lambda s: s["host_writes"] == "refused", what="the unit to become a replica")
    r = usbmirror("failback", "--state-dir", str(remote.state_dir), "--source", "server1", "--timeout", "120",
                  timeout=180)
    assert r.returncode == 0, r.stderr
    return again, r

def test_status_shows_primary_and_split_brain_on_both_units(units: Units, tmp_path: Path) -> None:
    tls = units.pair("dr1", ["server1"])
    remote = units.start_remote("dr1", targets={"server1": tmp_path / "target.img"}, tls_dir=tls)
    local = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address])
    st = local.wait_status(streaming(), what="the link to the remote")
    assert st["primary"] is True and st["split_brain"] is False
    gen = st["data_generation"]
    assert isinstance(gen, str) and gen.startswith("1:")
    (src,) = remote.status()["sources"]
    assert src["primary"] is False and src["split_brain"] is False
    # the generation is kept in the state directory: a restart keeps it
    local.stop()
    roles = json.loads((local.state_dir / "roles" / "server1.json").read_text())
    assert roles["primary"] is True and len(roles["history"]) == 1
    again = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address], state_dir=local.state_dir)
    st2 = again.wait_status(streaming(), what="the link after the restart")
    assert st2["data_generation"] == gen and st2["primary"] is True


def test_local_unit_without_remotes_is_primary(units: Units, tmp_path: Path) -> None:
    local = units.start_local(volume=tmp_path / "volume.img", size="16M")
    st = local.status()
    assert st["primary"] is True and st["split_brain"] is False


def test_promote_on_a_running_remote_unit(units: Units, tmp_path: Path) -> None:
    tls = units.pair("dr1", ["server1"])
    remote = units.start_remote("dr1", targets={"server1": tmp_path / "target.img"}, tls_dir=tls)
    local = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address])
    with attach(local) as c:
        assert c.write10(8, b"\x5a" * (4 * BS)) == 0
    st = local.wait_status(drained, what="the remote to catch up")
    (src,) = remote.status()["sources"]
    assert src["data_generation"] == st["data_generation"]  # the replica follows the source's generation
    port = free_port()
    refused = usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                        f"127.0.0.1:{port}")
    assert refused.returncode == 1 and "is connected and healthy" in refused.stderr
    local.kill9()
    remote.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")
    r = usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                  f"127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    assert "warning: source server1 is promoted while its local unit is" in r.stderr
    assert f"served read-write over USB/IP on 127.0.0.1:{port}" in r.stdout
    (src,) = remote.status()["sources"]
    assert src["primary"] is True and src["state"] == "primary"
    assert src["data_generation"].startswith("2:")
    assert "promoted source=server1" in remote.log()
    standby = UsbipClient("127.0.0.1", port)
    assert standby.import_device("1-1").device is not None
    standby.enumerate()
    standby.until_ready()
    with standby:
        assert standby.read10(8, 4) == b"\x5a" * (4 * BS)
        assert standby.write10(100, b"\x33" * BS) == 0
    assert read_block(tmp_path / "target.img", 100) == b"\x33" * BS
    # the old local unit comes back: the remote refuses its writes
    again = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address], state_dir=local.state_dir)
    st2 = again.wait_status(lambda s: "PRIMARY" in s["remotes"][0]["last_error"], what="the refusal")
    assert st2["remotes"][0]["state"] == "refused"
    assert "dr1 is primary for source server1 now" in st2["remotes"][0]["last_error"]
    assert read_block(tmp_path / "target.img", 100) == b"\x33" * BS
    # and it stays primary across a restart
    remote.stop()
    remote2 = units.start_remote("dr1", targets={"server1": tmp_path / "target.img"}, tls_dir=tls,
                                 state_dir=remote.state_dir, port=remote.port)
    assert remote2.status()["sources"][0]["primary"] is True
    with UsbipClient("127.0.0.1", port) as c2:
        assert c2.import_device("1-1").device is not None
        c2.enumerate()
        c2.until_ready()
        assert c2.read10(100, 1) == b"\x33" * BS


WRITE_PROTECTED = (0x7, 0x27, 0x00)


def test_the_old_primary_comes_back_as_a_replica_and_reports_its_lost_writes(units: Units, tmp_path: Path) -> None:
    tls = units.pair("dr1", ["server1"])
    target = tmp_path / "target.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address])
    with attach(local) as c:
        assert c.write10(8, b"\x5a" * (4 * BS)) == 0
    local.wait_status(drained, what="the remote to catch up")
    remote.stop()
    with attach(local) as c:  # acknowledged, journaled, never shipped: the remote is down
        for i in range(3):
            assert c.write10(200 + 4 * i, bytes([0x60 + i]) * (2 * BS)) == 0
    local.kill9()
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, state_dir=remote.state_dir,
                                port=remote.port)
    standby_port = free_port()
    r = usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                  f"127.0.0.1:{standby_port}")
    assert r.returncode == 0, r.stderr
    again = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address], state_dir=local.state_dir)
    st = again.wait_status(lambda s: s["host_writes"] == "refused", what="the unit to become a replica")
    assert st["primary"] is False and st["split_brain"] is False
    loss = st["failover_loss"]
    assert (loss["writes"], loss["bytes"], loss["peer"]) == (3, 3 * 2 * BS, "dr1")
    assert loss["generation"] == remote.status()["sources"][0]["data_generation"]
    assert "is a replica of dr1" in st["host_writes_reason"]
    assert "failover's loss" in st["role_message"] and "lost_writes=3" in again.log()
    with attach(again) as c:
        assert c.write10(0, b"\x11" * BS) == 1
        assert c.request_sense() == WRITE_PROTECTED
        assert c.read10(8, 4) == b"\x5a" * (4 * BS)  # reads go on
    # the lost writes never reached the promoted copy
    assert read_block(target, 200) == bytes(BS) and read_block(target, 8) == b"\x5a" * BS
    roles = json.loads((local.state_dir / "roles" / "server1.json").read_text())
    assert roles["primary"] is False and roles["failover_loss"]["writes"] == 3
    # a replica stays one across a restart: writes are refused from the first command on
    again.stop()
    third = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address], state_dir=local.state_dir)
    st3 = third.status()
    assert st3["host_writes"] == "refused" and st3["primary"] is False and st3["scsi"]["read_only"] is True
    with attach(third) as c:
        assert c.write10(0, b"\x11" * BS) == 1
        assert c.request_sense() == WRITE_PROTECTED


def _promoted_after_a_lost_write(units: Units, tmp_path: Path) -> tuple[Path, Path, Path, UnitProcess, UnitProcess,
                                                                      int]:
    """A local unit replicates 4 blocks at lba 8, acknowledges 2 more at lba 300 while the remote is
    down and dies; the restarted remote is promoted over USB/IP. Returns (tls, target, volume, the
    dead local unit, the promoted remote, the standby's USB/IP port)."""
    tls = units.pair("dr1", ["server1"])
    target, volume = tmp_path / "target.img", tmp_path / "volume.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address])
    with attach(local) as c:
        assert c.write10(8, b"\x5a" * (4 * BS)) == 0
    local.wait_status(drained, what="the remote to catch up")
    remote.stop()
    with attach(local) as c:  # lost in the failover: acknowledged, never shipped
        assert c.write10(300, b"\x61" * (2 * BS)) == 0
    local.kill9()
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, state_dir=remote.state_dir,
                                port=remote.port)
    standby_port = free_port()
    assert usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                     f"127.0.0.1:{standby_port}").returncode == 0
    return tls, target, volume, local, remote, standby_port


def test_planned_failback_moves_only_changed_regions_and_swaps_the_roles(units: Units, tmp_path: Path) -> None:
    tls, target, volume, local, remote, standby_port = _promoted_after_a_lost_write(units, tmp_path)
    with UsbipClient("127.0.0.1", standby_port) as standby:  # the standby host writes in regions 0 and 5
        assert standby.import_device("1-1").device is not None
        standby.enumerate()
        standby.until_ready()
        assert standby.write10(100, b"\x71" * BS) == 0
        assert standby.write10(5 * 2048 + 7, b"\x72" * (3 * BS)) == 0
    # the catch-up is off (--catch-up-interval 0): this test counts what the failback's own pull moves
    again, r = restart_as_replica_and_fail_back(units, local, remote, volume, tls, catch_up_interval="0")
    assert "catch_up" not in again.status()
    assert "failed back source server1" in r.stdout
    st = again.wait_status(lambda s: s["host_writes"] == "accepted", what="the unit to serve writes again")
    assert st["primary"] is True and st["data_generation"].startswith("3:")
    rs = st["last_resync"]
    # regions 0 and 5 differ; inside them only the 4 KiB pieces written: lba 96-103 (the standby's),
    # 296-303 (the lost write, undone) and 10240-10255 (the standby's 3 blocks across two pieces)
    assert isinstance(rs["bytes_moved"], int) and rs["bytes_moved"] == 4 * 4096
    assert rs["regions_copied"] == 2 and rs["pieces_compared"] == 2 * 256 and rs["seconds"] >= 0
    assert volume.read_bytes() == target.read_bytes()  # the lost write is gone, the standby's are here
    assert read_block(volume, 300) == bytes(BS) and read_block(volume, 100) == b"\x71" * BS
    (src,) = remote.status()["sources"]
    assert src["primary"] is False and src["data_generation"] == st["data_generation"]
    # replication resumes: a new write through the local unit reaches the remote
    again.wait_status(streaming(), what="the link to resume")
    with attach(again) as c:
        assert c.write10(40, b"\x81" * (2 * BS)) == 0
    again.wait_status(drained, what="the remote to take the new write")
    assert volume.read_bytes() == target.read_bytes()


def test_a_replica_catches_up_with_the_promoted_copy_before_any_failback(units: Units, tmp_path: Path) -> None:
    """The old primary, a replica of the promoted remote, follows the standby host's writes while the
    promoted copy is served (every --catch-up-interval), refusing host writes all along; the failback
    then has nothing left to move."""
    tls, target, volume, local, remote, standby_port = _promoted_after_a_lost_write(units, tmp_path)
    with UsbipClient("127.0.0.1", standby_port) as standby:
        assert standby.import_device("1-1").device is not None
        standby.enumerate()
        standby.until_ready()
        assert standby.write10(100, b"\x71" * BS) == 0
        assert standby.write10(5 * 2048 + 7, b"\x72" * (3 * BS)) == 0
        again = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls,
                                  remotes=[remote.address], state_dir=local.state_dir,
                                  extra=["--catch-up-interval", "1"])
        st = again.wait_status(lambda s: (s.get("catch_up") or {}).get("bytes_moved", 0) > 0,
                               what="a catch-up that pulled the standby's writes")
        cu = st["catch_up"]
        assert "error" not in cu and "skipped" not in cu, cu
        assert cu["from"] == "dr1" and cu["bytes_compared"] > 0 and cu["seconds"] >= 0 and cu["at_ns"] > 0
        assert st["host_writes"] == "refused" and st["primary"] is False
        # no failback ran: the standby's writes are on the old primary's volume, the lost write is undone
        assert read_block(volume, 100) == b"\x71" * BS and read_block(volume, 5 * 2048 + 9) == b"\x72" * BS
        assert read_block(volume, 300) == bytes(BS)
        assert remote.status()["sources"][0]["primary"] is True  # the promoted copy is still served
        with attach(again) as c:
            assert c.read10(100, 1) == b"\x71" * BS  # the host reads the caught-up data
            assert c.write10(0, b"\x11" * BS) == 1  # and still may not write
            assert c.request_sense() == WRITE_PROTECTED
        # the standby host writes on: a later catch-up brings that too
        assert standby.write10(9 * 2048, b"\x73" * (2 * BS)) == 0
        again.wait_status(lambda s: read_block(volume, 9 * 2048 + 1) == b"\x73" * BS,
                          what="the next catch-up to pull the standby's new write")
    assert read_block(volume, 0) == bytes(BS)  # the refused write left nothing
    assert "caught up with the promoted copy remote=dr1" in again.log()
    r = usbmirror("failback", "--state-dir", str(remote.state_dir), "--source", "server1", "--timeout", "120",
                  timeout=180)
    assert r.returncode == 0, r.stderr
    st = again.wait_status(lambda s: s["host_writes"] == "accepted", what="the unit to serve writes again")
    assert st["primary"] is True and "catch_up" not in st
    # the catch-ups had pulled every change: the failback compared the same regions and moved nothing
    assert st["last_resync"]["bytes_moved"] == 0 and st["last_resync"]["mode"] == "bitmap"
    assert volume.read_bytes() == target.read_bytes()


@pytest.mark.parametrize("keep", ["remote", "local"])
def test_split_brain_is_reported_on_both_sides_and_resolved(units: Units, tmp_path: Path, keep: str) -> None:
    tls = units.pair("dr1", ["server1"])
    target, volume = tmp_path / "target.img", tmp_path / "volume.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address])
    with attach(local) as c:
        assert c.write10(8, b"\x5a" * (4 * BS)) == 0
    local.wait_status(drained, what="the remote to catch up")
    remote.stop()
    # a partition: the remote comes back where the local unit cannot reach it, and is promoted
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, state_dir=remote.state_dir)
    standby_port = free_port()
    assert usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                     f"127.0.0.1:{standby_port}").returncode == 0
    with attach(local) as c:  # the local unit's host goes on writing after the promotion
        assert c.write10(400, b"\x62" * (8 * BS)) == 0
    with UsbipClient("127.0.0.1", standby_port) as standby:  # and so does the standby host
        assert standby.import_device("1-1").device is not None
        standby.enumerate()
        standby.until_ready()
        assert standby.write10(3 * 2048, b"\x73" * (2 * BS)) == 0
    local.stop()
    local_before, target_before = volume.read_bytes(), target.read_bytes()
    again = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address],
                              state_dir=local.state_dir)
    st = again.wait_status(lambda s: s["split_brain"] is True, what="the local unit to see the split brain")
    assert st["primary"] is True and st["host_writes"] == "accepted"
    assert st["split_brain_detail"]["own_bytes"] > 0 and st["split_brain_detail"]["peer"] == "dr1"
    src = remote.wait_status(lambda s: s["sources"][0]["split_brain"] is True, timeout=90,
                             what="the remote to see the split brain")["sources"][0]
    assert src["split_brain_detail"]["own_bytes"] > 0 and src["split_brain_detail"]["peer_bytes"] > 0
    # nothing moved on either side
    assert volume.read_bytes() == local_before and target.read_bytes() == target_before
    dry = usbmirror("resolve", "--state-dir", str(again.state_dir), "--source", "server1", "--keep", "remote",
                    "--dry-run")
    assert dry.returncode == 0 and "would discard 0.003906 MiB (4096 bytes) written on this local unit" in dry.stdout
    assert again.status()["primary"] is True and volume.read_bytes() == local_before
    if keep == "remote":
        r = usbmirror("resolve", "--state-dir", str(again.state_dir), "--source", "server1", "--keep", "remote")
        assert r.returncode == 0 and "discarded 0.003906 MiB (4096 bytes)" in r.stdout
        assert again.status()["host_writes"] == "refused"
        fb = usbmirror("failback", "--state-dir", str(remote.state_dir), "--source", "server1", "--timeout", "120",
                       timeout=180)
        assert fb.returncode == 0, fb.stderr
        again.wait_status(lambda s: s["host_writes"] == "accepted" and s["split_brain"] is False,
                          what="the local unit to be primary again")
        assert read_block(volume, 3 * 2048) == b"\x73" * BS and read_block(volume, 400) == bytes(BS)
    else:
        d2 = usbmirror("resolve", "--state-dir", str(remote.state_dir), "--source", "server1", "--keep", "local",
                       "--dry-run")
        assert d2.returncode == 0 and "would discard 1 MiB (1048576 bytes) written on dr1" in d2.stdout
        assert target.read_bytes() == target_before
        r = usbmirror("resolve", "--state-dir", str(remote.state_dir), "--source", "server1", "--keep", "local")
        assert r.returncode == 0, r.stderr
        assert remote.status()["sources"][0]["primary"] is False
        again.wait_status(lambda s: s["split_brain"] is False and resynced(s), timeout=120,
                          what="the remote to be resynced from the local unit")
        assert read_block(target, 400) == b"\x62" * BS and read_block(target, 3 * 2048) == bytes(BS)
    assert volume.read_bytes() == target.read_bytes()


def test_promote_over_iscsi_then_failback_brings_the_standby_writes_home(units: Units, tmp_path: Path) -> None:
    import shutil
    import subprocess

    from host_tests.iscsi_support import LoginRefused, SocketInitiator

    chap = ("standby", "a-long-secret-1")
    tls = units.pair("dr1", ["server1"])
    target, volume = tmp_path / "target.img", tmp_path / "volume.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address])
    written = bytes(range(256)) * (16 * BS // 256)
    with attach(local) as c:
        assert c.write10(8, written) == 0
    local.wait_status(drained, what="the remote to catch up")
    local.kill9()
    remote.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")
    port = free_port()
    r = usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--iscsi",
                  f"127.0.0.1:{port}", "--iscsi-chap", ":".join(chap))
    assert r.returncode == 0, r.stderr
    assert f"served read-write over iSCSI on 127.0.0.1:{port} target iqn.2026-01.net.usbmirror:copy-server1-" \
        in r.stdout and "(CHAP)" in r.stdout
    (src,) = remote.status()["sources"]
    iqn = src["promotion"]["iscsi_target"]
    assert src["primary"] is True and src["promotion"]["iscsi"] == f"127.0.0.1:{port}"
    assert src["served"]["bus"] == "iscsi" and src["served"]["chap"] is True and chap[1] not in json.dumps(src)
    # an outside initiator (libiscsi) sees the disk, with CHAP only
    if shutil.which("iscsi-readcapacity16") is None:
        pytest.fail("iscsi-readcapacity16 missing: `make setup` installs Debian's libiscsi-bin")
    rc = subprocess.run(["iscsi-readcapacity16", "-s", f"iscsi://{chap[0]}%{chap[1]}@127.0.0.1:{port}/{iqn}/0"],
                        capture_output=True, text=True, timeout=30)
    assert rc.returncode == 0 and rc.stdout.strip() == str(16 << 20), rc.stdout + rc.stderr
    assert subprocess.run(["iscsi-readcapacity16", "-s", f"iscsi://127.0.0.1:{port}/{iqn}/0"],
                          capture_output=True, text=True, timeout=30).returncode != 0
    with pytest.raises(LoginRefused):
        SocketInitiator(port, iqn)
    with SocketInitiator(port, iqn, chap=chap) as standby:  # the standby host: reads what the source wrote, writes
        assert standby.read10(8, 16) == written
        assert standby.write10(100, b"\x71" * BS) == (0, b"")
        assert standby.write10(5 * 2048 + 7, b"\x72" * (3 * BS)) == (0, b"")
    # the default catch-up runs (its first one soon after the unit is a replica): whatever it pulled
    # before the failback, the copies end equal
    again, r = restart_as_replica_and_fail_back(units, local, remote, volume, tls, catch_up_interval="30")
    with pytest.raises(OSError):  # the standby host lost the disk
        SocketInitiator(port, iqn, chap=chap)
    st = again.wait_status(lambda s: s["host_writes"] == "accepted", what="the unit to serve writes again")
    assert st["primary"] is True
    assert volume.read_bytes() == target.read_bytes()  # the standby's writes are home
    assert read_block(volume, 100) == b"\x71" * BS and read_block(volume, 5 * 2048 + 9) == b"\x72" * BS
    assert "served" not in remote.status()["sources"][0]


def test_an_old_primary_with_unrelated_data_is_refused_and_nothing_changes(units: Units, tmp_path: Path) -> None:
    """The protected server's disk was replaced (another volume, a fresh state dir: no generation in
    common with the promoted copy): the remote's copy is not touched, the unit is told it holds
    unrelated data, and `resolve` has no split brain to decide."""
    tls = units.pair("dr1", ["server1"])
    target = tmp_path / "target.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address])
    with attach(local) as c:
        assert c.write10(8, b"\x5a" * (4 * BS)) == 0
    local.wait_status(drained, what="the remote to catch up")
    local.kill9()
    remote.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")
    assert usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                     f"127.0.0.1:{free_port()}").returncode == 0
    target_before = target.read_bytes()
    other = units.start_local(volume=tmp_path / "other.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address])
    with attach(other) as c:
        assert c.write10(8, b"\x99" * BS) == 0
    st = other.wait_status(lambda s: "unrelated" in (s.get("role_message") or ""), what="the unrelated outcome")
    assert "dr1 holds unrelated data" in st["role_message"] and "refused" in st["role_message"]
    assert st["primary"] is True and st["split_brain"] is False and st["host_writes"] == "accepted"
    assert st["remotes"][0]["state"] != "streaming"
    r = usbmirror("resolve", "--state-dir", str(other.state_dir), "--source", "server1", "--keep", "remote")
    assert r.returncode != 0 and "no split brain is recorded" in r.stderr + r.stdout
    (src,) = remote.status()["sources"]
    assert src["primary"] is True and src["split_brain"] is False
    assert target.read_bytes() == target_before
    with attach(other) as c:
        assert c.read10(8, 1) == b"\x99" * BS
