"""Failback reads and moves only what either side wrote since the two last agreed (docs/FAILOVER.md,
"Planned failback"): real `usbmirror local` / `usbmirror remote` processes on a sparse volume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_tests.units import UnitProcess, Units, drained, free_port, streaming, usbmirror
from host_tests.usbip_support import UsbipClient

BS = 512
MIB = 1 << 20
REGION = 2048  # blocks in one 1 MiB region
SIZE = "64M"


def attach(port: int) -> UsbipClient:
    c = UsbipClient("127.0.0.1", port)
    assert c.import_device("1-1").device is not None
    c.enumerate()
    c.until_ready()
    return c


def read_block(path: Path, lba: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(lba * BS)
        return f.read(BS)


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    with Units(tmp_path) as u:
        yield u


def promoted_with_writes(units: Units, tmp_path: Path) -> tuple[UnitProcess, UnitProcess, Path, Path, Path]:
    """The local unit replicates, loses writes in regions 3 and 9 (the remote is down), dies; the
    remote is promoted and its standby host writes in regions 9 (the same block) and 20. Returns
    (local, remote, volume, target, tls)."""
    tls = units.pair("dr1", ["server1"])
    target, volume = tmp_path / "target.img", tmp_path / "volume.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=volume, size=SIZE, source_id="server1", tls_dir=tls, remotes=[remote.address])
    with attach(local.port) as c:  # shipped: both sides agree on it
        assert c.write10(40 * REGION, b"\x5a" * (8 * BS)) == 0
    local.wait_status(drained, what="the remote to catch up")
    remote.stop()
    with attach(local.port) as c:  # acknowledged, never shipped: the failover's loss
        assert c.write10(3 * REGION + 16, b"\x61" * (8 * BS)) == 0
        assert c.write10(9 * REGION + 64, b"\x62" * (8 * BS)) == 0
    local.kill9()
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, state_dir=remote.state_dir,
                                port=remote.port)
    standby_port = free_port()
    assert usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                     f"127.0.0.1:{standby_port}").returncode == 0
    with attach(standby_port) as standby:
        assert standby.write10(9 * REGION + 64, b"\x71" * (8 * BS)) == 0  # the block the local unit lost too
        assert standby.write10(20 * REGION, b"\x72" * (16 * BS)) == 0
    return local, remote, volume, target, tls


def fail_back(units: Units, local: UnitProcess, remote: UnitProcess, volume: Path, tls: Path) -> UnitProcess:
    # the replica's catch-up is off (--catch-up-interval 0): these tests count what the failback itself
    # compares and pulls, which a catch-up before it would have pulled already
    again = units.start_local(volume=volume, size=SIZE, source_id="server1", tls_dir=tls, remotes=[remote.address],
                              state_dir=local.state_dir, extra=["--catch-up-interval", "0"])
    again.wait_status(lambda s: s["host_writes"] == "refused", what="the unit to become a replica")
    r = usbmirror("failback", "--state-dir", str(remote.state_dir), "--source", "server1", "--timeout", "120",
                  timeout=180)
    assert r.returncode == 0, r.stderr
    again.wait_status(lambda s: s["host_writes"] == "accepted", what="the unit to serve writes again")
    return again


def test_failback_reads_only_the_union_of_both_sides_writes(units: Units, tmp_path: Path) -> None:
    local, remote, volume, target, tls = promoted_with_writes(units, tmp_path)
    promo = json.loads((remote.state_dir / "roles" / "server1.json").read_text())["promotion"]
    assert promo["bitmap"] == remote.status()["sources"][0]["data_generation"]
    again = fail_back(units, local, remote, volume, tls)
    rs = again.status()["last_resync"]
    # regions 3 and 9 (this unit's lost writes) and 9 and 20 (the standby's): 3 of the 64 regions read
    assert rs["mode"] == "bitmap" and "mode_reason" not in rs
    assert rs["regions_compared"] == 3 and rs["regions_total"] == 64
    assert rs["bytes_compared"] == 3 * MIB
    assert remote.status()["sources"][0]["last_resync"]["bytes_compared"] == 3 * MIB  # read on the remote too
    assert rs["pieces_compared"] == 3 * 256
    # the pieces that differ: lba 16-23 of region 3, 64-71 of region 9, 0-15 of region 20 (4 KiB pieces)
    assert isinstance(rs["bytes_moved"], int) and rs["bytes_moved"] == 4 * 4096
    assert rs["regions_copied"] == 3 and rs["seconds"] >= 0
    assert volume.read_bytes() == target.read_bytes()
    assert read_block(volume, 9 * REGION + 64) == b"\x71" * BS  # written on both sides: the promoted side's
    assert read_block(volume, 3 * REGION + 16) == bytes(BS)  # written here only, after agreement: the loss, undone
    assert read_block(volume, 20 * REGION + 15) == b"\x72" * BS and read_block(volume, 40 * REGION) == b"\x5a" * BS
    assert "mode=bitmap bytes_moved=16384 bytes_compared=3145728" in again.log()
    # replication resumes after it
    again.wait_status(streaming(), what="the link to resume")
    with attach(again.port) as c:
        assert c.write10(50 * REGION, b"\x81" * (2 * BS)) == 0
    again.wait_status(drained, what="the remote to take the new write")
    assert volume.read_bytes() == target.read_bytes()


def test_a_lost_bitmap_on_the_promoted_side_falls_back_to_comparing_every_region(units: Units,
                                                                                  tmp_path: Path) -> None:
    local, remote, volume, target, tls = promoted_with_writes(units, tmp_path)
    remote.stop()
    (remote.state_dir / "roles" / "server1.server1.bitmap").unlink()  # the record of the standby's writes is gone
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, state_dir=remote.state_dir,
                                port=remote.port)
    promo = json.loads((remote.state_dir / "roles" / "server1.json").read_text())["promotion"]
    assert "is missing" in promo["bitmap_lost"]
    again = fail_back(units, local, remote, volume, tls)
    rs = again.status()["last_resync"]
    assert rs["mode"] == "full" and "cannot be trusted" in rs["mode_reason"] and "is missing" in rs["mode_reason"]
    assert rs["regions_compared"] == 64
    assert rs["bytes_compared"] == 64 * MIB + 3 * MIB  # every region, then the pieces of the 3 that differ
    assert remote.status()["sources"][0]["last_resync"]["bytes_compared"] == 67 * MIB
    assert rs["bytes_moved"] == 4 * 4096
    assert "failback: comparing every region" in again.log()
    assert volume.read_bytes() == target.read_bytes()  # the standby's region 20 came home all the same
    assert read_block(volume, 20 * REGION) == b"\x72" * BS and read_block(volume, 9 * REGION + 64) == b"\x71" * BS


def test_a_promotion_at_an_earlier_point_marks_what_it_rolled_back_and_failback_undoes_it(units: Units,
                                                                                          tmp_path: Path) -> None:
    tls = units.pair("dr1", ["server1"])
    target, volume = tmp_path / "target.img", tmp_path / "volume.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, extra=["--history-size", "64M"])
    local = units.start_local(volume=volume, size=SIZE, source_id="server1", tls_dir=tls, remotes=[remote.address])
    with attach(local.port) as c:
        assert c.write10(1 * REGION, b"\x5a" * (4 * BS)) == 0
        assert c.scsi(bytes([0x35]) + bytes(9)).csw_status == 0  # SYNCHRONIZE CACHE: a restore point
    point = local.wait_status(drained, what="the remote to catch up")["journal"]["durable_seq"]
    with attach(local.port) as c:  # shipped and applied, then rolled back by the promotion
        assert c.write10(5 * REGION + 8, b"\x65" * (2 * BS)) == 0
        assert c.write10(7 * REGION, b"\x67" * (2 * BS)) == 0
    local.wait_status(drained, what="the remote to take the later writes")
    local.kill9()
    remote.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")
    standby_port = free_port()
    r = usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                  f"127.0.0.1:{standby_port}", "--seq", str(point))
    assert r.returncode == 0, r.stderr
    # the blocks the rollback rewrote are in the promoted copy's bitmap (regions 5 and 7)
    bits = (remote.state_dir / "roles" / "server1.server1.bitmap").read_bytes()[4096:4104]
    assert bits == bytes([1 << 5 | 1 << 7]) + bytes(7)
    with attach(standby_port) as standby:
        assert standby.write10(12 * REGION, b"\x7c" * (8 * BS)) == 0
    again = fail_back(units, local, remote, volume, tls)
    rs = again.status()["last_resync"]
    assert rs["mode"] == "bitmap" and rs["regions_compared"] == 3 and rs["bytes_compared"] == 3 * MIB
    assert rs["bytes_moved"] == 3 * 4096
    assert volume.read_bytes() == target.read_bytes()
    assert read_block(volume, 5 * REGION + 8) == bytes(BS) and read_block(volume, 7 * REGION) == bytes(BS)
    assert read_block(volume, 12 * REGION) == b"\x7c" * BS and read_block(volume, REGION) == b"\x5a" * BS
