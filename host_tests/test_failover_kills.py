"""Kills at each crash-safe step of promote, failback and resolve (docs/FAILOVER.md, "Crashes").

The unit doing a step is started with `USBMIRROR_CRASH_AT=POINT` (`firmware/crash_points.py`) and
SIGKILLs itself at that instant: after a state was recorded and before the next. It is started
again without it; the step must resume (or roll back) by itself, and nothing acknowledged on the
side that was kept may be lost: the standby host's writes after a failback, the local unit's
writes after `resolve --keep local`, the promoted copy's after `resolve --keep remote`, the image
at the point asked for after a promotion with a rollback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.crash_points import ENV, POINTS
from host_tests.test_failover_units import resynced
from host_tests.units import REPO, UnitProcess, Units, drained, free_port, streaming, usbmirror
from host_tests.usbip_support import UsbipClient

BS = 512
REGION = 2048  # blocks per 1 MiB region


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    with Units(tmp_path) as u:
        yield u


def attach(port: int) -> UsbipClient:
    c = UsbipClient("127.0.0.1", port)
    assert c.import_device("1-1").device is not None
    c.enumerate()
    c.until_ready()
    return c


def read_block(path: Path, lba: int, n: int = 1) -> bytes:
    with open(path, "rb") as f:
        f.seek(lba * BS)
        return f.read(n * BS)


def armed(monkeypatch: pytest.MonkeyPatch, point: str | None) -> None:
    assert point is None or point in POINTS
    if point is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, point)


def restart(unit: UnitProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the unit killed itself at its crash point: start it again, unarmed, on the same files."""
    assert unit.proc is not None
    assert unit.wait_exit(60) == -9, f"the {unit.role} unit did not stop at its crash point:\n{unit.log()}"
    assert "crash point reached" in unit.log()
    armed(monkeypatch, None)
    unit.launch()
    unit.wait_ready(60)


def crashed(unit: UnitProcess) -> bool:
    return unit.proc is not None and unit.proc.poll() is not None


def wait_dead(unit: UnitProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not crashed(unit):
        assert time.monotonic() < deadline, f"the {unit.role} unit never reached its crash point:\n{unit.log()}"
        time.sleep(0.1)


def failback_cmd(state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "firmware.cli", "failback", "--state-dir", str(state), "--source",
                             "server1", "--timeout", "120"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)


def primary_again(local: UnitProcess, remote: UnitProcess, volume: Path, target: Path) -> None:
    """The end of a failback: the local unit serves writes, the remote is its replica, the copies are
    equal, and a new write through the local unit reaches the remote."""
    st = local.wait_status(lambda s: s["host_writes"] == "accepted" and s["primary"] is True, timeout=90,
                           what="the local unit to be primary again")
    remote.wait_status(lambda s: s["sources"][0]["primary"] is False, timeout=60, what="the remote to be a replica")
    assert remote.status()["sources"][0]["data_generation"] == st["data_generation"]
    local.wait_status(streaming(), timeout=60, what="replication to resume")
    with attach(local.port) as c:
        assert c.write10(40, b"\x81" * (2 * BS)) == 0
    local.wait_status(drained, timeout=60, what="the remote to take the new write")
    assert volume.read_bytes() == target.read_bytes()


# -- promote ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("point", ["promote.recorded", "promote.rolling_back"])
def test_a_promotion_killed_midway_is_finished_when_the_remote_starts(units: Units, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     point: str) -> None:
    tls = units.pair("dr1", ["server1"])
    target, volume = tmp_path / "target.img", tmp_path / "volume.img"
    armed(monkeypatch, point)
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, extra=["--history-size", "64M"])
    armed(monkeypatch, None)
    local = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address])
    with attach(local.port) as c:
        assert c.write10(8, b"\x5a" * (4 * BS)) == 0
        assert c.scsi(bytes([0x35]) + bytes(9)).csw_status == 0  # SYNCHRONIZE CACHE: a restore point
    at_point = local.wait_status(drained, what="the remote to catch up")["journal"]["durable_seq"]
    with attach(local.port) as c:  # 40 separate runs: more than one batch of rollback writes
        for i in range(40):
            assert c.write10(300 + i * 400, bytes([i + 1]) * (2 * BS)) == 0
    local.wait_status(drained, what="the remote to take the later writes")
    image_at_point = bytearray(16 << 20)
    image_at_point[8 * BS:12 * BS] = b"\x5a" * (4 * BS)
    local.kill9()
    remote.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")
    port = free_port()
    args = ["--seq", str(at_point)] if point == "promote.rolling_back" else []
    r = usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                  f"127.0.0.1:{port}", *args)
    assert r.returncode != 0 and crashed(remote), f"promote did not crash the remote: {r.stdout}{r.stderr}"
    saved = json.loads((remote.state_dir / "roles" / "server1.json").read_text())
    assert saved["primary"] is True  # the new generation was recorded before the crash
    if point == "promote.rolling_back":
        assert saved["promotion"]["rollback_to_seq"] == at_point  # recorded as unfinished
    restart(remote, monkeypatch)
    (src,) = remote.status()["sources"]
    assert "pending_step" not in src
    assert src["primary"] is True and src["promotion"]["usbip"] == f"127.0.0.1:{port}"
    assert src["promotion"]["rollback_to_seq"] is None  # finished before anything was served
    with attach(port) as standby:
        if point == "promote.rolling_back":
            assert src["promotion"]["rolled_back_blocks"] == 40 * 2
            seen = b"".join(standby.read10(lba, 256) for lba in range(0, 16 * REGION, 256))
            assert seen == bytes(image_at_point), "the served copy is not the image at the point"
        else:  # the newest image, every acknowledged write in it
            assert standby.read10(8, 4) == b"\x5a" * (4 * BS)
            assert standby.read10(300 + 39 * 400, 2) == bytes([40]) * (2 * BS)
        assert standby.write10(100, b"\x33" * BS) == 0
    assert read_block(target, 100) == b"\x33" * BS


# -- failback --------------------------------------------------------------------------------------

REMOTE_POINTS = {"failback.handover", "failback.handed_back"}


@pytest.mark.slow
@pytest.mark.parametrize("point", ["failback.handover", "failback.pulled", "failback.taken_over",
                                   "failback.handed_back"])
def test_a_failback_killed_midway_resumes_and_keeps_the_standby_hosts_writes(units: Units, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           point: str) -> None:
    tls = units.pair("dr1", ["server1"])
    target, volume = tmp_path / "target.img", tmp_path / "volume.img"
    armed(monkeypatch, point if point in REMOTE_POINTS else None)
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    armed(monkeypatch, None)
    local = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address])
    with attach(local.port) as c:
        assert c.write10(8, b"\x5a" * (4 * BS)) == 0
    local.wait_status(drained, what="the remote to catch up")
    local.kill9()
    remote.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")
    standby_port = free_port()
    assert usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                     f"127.0.0.1:{standby_port}").returncode == 0
    standby_data = {r * REGION + 5: bytes([0x70 + r]) * (3 * BS) for r in (0, 3, 6, 9)}
    with attach(standby_port) as standby:  # acknowledged on the promoted copy: must survive the failback
        for lba, data in standby_data.items():
            assert standby.write10(lba, data) == 0
    armed(monkeypatch, None if point in REMOTE_POINTS else point)
    again = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address],
                              state_dir=local.state_dir, port=local.port)
    armed(monkeypatch, None)
    again.wait_status(lambda s: s["host_writes"] == "refused", what="the unit to become a replica")
    fb = failback_cmd(remote.state_dir)
    try:
        victim = remote if point in REMOTE_POINTS else again
        wait_dead(victim)
        restart(victim, monkeypatch)
        if point == "failback.handover":  # the restarted remote never served the copy again
            assert "promoted_io" not in remote.status()["sources"][0]
            with pytest.raises(OSError):
                attach(standby_port)
        primary_again(again, remote, volume, target)
        if point == "failback.pulled":  # restarted a replica (no half-pulled image took writes), compared again
            run = again.log(1 << 20).rsplit("==== start:", 1)[1]
            assert run.index("host writes refused") < run.index("failback: pulling") < run.index("failback complete")
    finally:
        if fb.poll() is None:
            fb.kill()
        fb.communicate(timeout=30)
    for lba, data in standby_data.items():
        assert read_block(volume, lba, 3) == data


# -- resolve ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("point", ["resolve.recorded", "resolve.saved"])
def test_a_resolve_killed_midway_resumes_and_keeps_the_kept_sides_writes(units: Units, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       point: str) -> None:
    keep_local = point == "resolve.recorded"  # run on the remote; resolve.saved is --keep remote on the local unit
    tls = units.pair("dr1", ["server1"])
    target, volume = tmp_path / "target.img", tmp_path / "volume.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address])
    with attach(local.port) as c:
        assert c.write10(8, b"\x5a" * (4 * BS)) == 0
    local.wait_status(drained, what="the remote to catch up")
    remote.stop()
    # a partition: the remote comes back where the local unit cannot reach it, and is promoted
    armed(monkeypatch, point if keep_local else None)
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, state_dir=remote.state_dir)
    armed(monkeypatch, None)
    standby_port = free_port()
    assert usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                     f"127.0.0.1:{standby_port}").returncode == 0
    with attach(local.port) as c:  # both sides write: a split brain
        assert c.write10(400, b"\x62" * (8 * BS)) == 0
    with attach(standby_port) as standby:
        assert standby.write10(3 * REGION, b"\x73" * (2 * BS)) == 0
    local.stop()
    armed(monkeypatch, None if keep_local else point)
    again = units.start_local(volume=volume, size="16M", source_id="server1", tls_dir=tls, remotes=[remote.address],
                              state_dir=local.state_dir)
    armed(monkeypatch, None)
    again.wait_status(lambda s: s["split_brain"] is True, what="the local unit to see the split brain")
    remote.wait_status(lambda s: s["sources"][0]["split_brain"] is True, timeout=90,
                       what="the remote to see the split brain")
    victim = remote if keep_local else again
    r = usbmirror("resolve", "--state-dir", str(victim.state_dir), "--source", "server1", "--keep",
                  "local" if keep_local else "remote")
    assert r.returncode != 0, r.stdout
    wait_dead(victim)
    saved = json.loads((victim.state_dir / "roles" / "server1.json").read_text())
    assert saved["primary"] is False  # the resolution was recorded before the crash
    restart(victim, monkeypatch)
    if keep_local:  # the remote finished resetting its target at start: the local unit's writes reach it
        assert "pending_step" not in remote.status()["sources"][0]
        again.wait_status(lambda s: s["split_brain"] is False and resynced(s), timeout=120,
                          what="the remote to be resynced from the local unit")
        assert read_block(target, 400, 8) == b"\x62" * (8 * BS) and read_block(target, 3 * REGION) == bytes(BS)
        assert volume.read_bytes() == target.read_bytes()
    else:  # the local unit is the replica from its first command; failback brings the standby's writes
        st = again.status()
        assert st["host_writes"] == "refused" and st["primary"] is False and st["scsi"]["read_only"] is True
        fb = usbmirror("failback", "--state-dir", str(remote.state_dir), "--source", "server1", "--timeout", "120",
                       timeout=180)
        assert fb.returncode == 0, fb.stderr
        primary_again(again, remote, volume, target)
        assert read_block(volume, 3 * REGION, 2) == b"\x73" * (2 * BS) and read_block(volume, 400) == bytes(BS)
