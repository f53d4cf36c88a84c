"""`usbmirror selftest` against a healthy installation and broken ones: no UDC, unreachable remote,
wrong certificate, a source the remote does not know, read-only journal, unit not running. Each is
reported as the failure it is. The remote is the project's real remote unit (a subprocess with TLS
files made by `usbmirror pair`); the local unit is a control socket answering `status`."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from firmware.control import ControlServer
from firmware.pairing import pair
from firmware.selftest import RemoteTarget, SelftestConfig, Verdict, config_from_options, run_selftest
from host_tests.units import Units, free_port

VOLUME = 8 << 20


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    good = tmp_path_factory.mktemp("tls")
    pair(good, "r1", ["site-a", "site-b"])
    other = tmp_path_factory.mktemp("tls-other")
    pair(other, "r1", ["site-a"])  # same names, another CA: the wrong certificate
    return good, other


@pytest.fixture(scope="module")
def remote(tls: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteTarget]:
    d = tmp_path_factory.mktemp("remote")
    target = d / "site-a.img"
    target.write_bytes(b"\0" * VOLUME)
    with Units(d) as units:
        unit = units.start_remote("r1", targets={"site-a": target}, tls_dir=tls[0])
        yield RemoteTarget("127.0.0.1", unit.port, "r1")


def _usb_tree(tmp: Path, *, udc: bool = True) -> tuple[Path, Path]:
    configfs = tmp / "config"
    udc_class = tmp / "udc"
    udc_class.mkdir()
    gadget = configfs / "usb_gadget" / "usbmirror"
    gadget.mkdir(parents=True)
    if udc:
        (udc_class / "fe980000.usb").mkdir()
        (udc_class / "fe980000.usb" / "state").write_text("configured\n")
        (udc_class / "fe980000.usb" / "current_speed").write_text("high-speed\n")
        (gadget / "UDC").write_text("fe980000.usb\n")
    else:
        (gadget / "UDC").write_text("\n")
    return configfs, udc_class


STATUS: dict[str, Any] = {
    "role": "local", "pid": 4242, "uptime_s": 120.0, "transports": ["gadget udc fe980000.usb"],
    "unit_uuid": "12345678-1234-5678-1234-567812345678",
    "volume": {"path": "/dev/sda", "size_bytes": VOLUME, "block_size": 512},
    "scsi": {"commands": {"READ_10": 120, "WRITE_10": 40, "SYNCHRONIZE_CACHE_10": 4, "INQUIRY": 3},
             "transfer_sizes": {"4K": 90, "64K": 30}, "flushes": 4, "fua_writes": 0},
    "usb": [{"transport": "functionfs", "enabled": True, "udc_state": "configured"}],
}


@contextlib.contextmanager
def running_unit(state_dir: Path, status: dict[str, Any]) -> Iterator[None]:
    server = ControlServer(state_dir)
    server.register("status", lambda req: dict(status))
    with server:
        yield


def _config(tmp: Path, tls_dir: Path, remote: RemoteTarget, **kw: Any) -> SelftestConfig:
    configfs, udc_class = _usb_tree(tmp, udc=kw.pop("udc", True))
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    base = SelftestConfig(state_dir=state, gadget="", journal=state / "journal", journal_size=1 << 20,
                          remotes=(remote,), source_id="site-a", tls_dir=tls_dir, configfs_root=configfs,
                          udc_class=udc_class, timeout=5.0, sync_probe_count=20)
    return replace(base, **kw)


def verdicts(report: Any) -> dict[str, Verdict]:
    return {c.name: c.verdict for c in report.checks}


def test_healthy_installation_passes_everything(tmp_path: Path, tls: tuple[Path, Path],
                                                remote: RemoteTarget) -> None:
    cfg = _config(tmp_path, tls[0], remote)
    with running_unit(cfg.state_dir, STATUS):
        report = run_selftest(cfg)
    v = verdicts(report)
    label = f"remote {remote.label}"
    assert v == {"udc": Verdict.PASS, "gadget binding": Verdict.PASS, "unit running": Verdict.PASS,
                 "host enumerated": Verdict.PASS, "host profile": Verdict.PASS, "journal device": Verdict.PASS,
                 f"{label} TLS": Verdict.PASS, f"{label} target": Verdict.PASS, f"{label} rtt": Verdict.PASS,
                 f"{label} throughput": Verdict.PASS}, report.render()
    assert report.ok
    assert "high-speed" in report.by_name("gadget binding").detail
    assert report.by_name("journal device").data["fdatasync_per_s"] > 0
    assert report.by_name(f"{label} throughput").data["bytes"] == VOLUME
    assert "SYNCHRONIZE_CACHE_10x4" in report.by_name("host profile").detail
    profile = json.loads((cfg.state_dir / "host-profile.json").read_text())
    assert profile["commands"]["WRITE_10"] == 40 and profile["flushes"] == 4
    doc = json.loads(report.to_json())
    assert doc["ok"] is True and len(doc["checks"]) == 10
    table = report.render()
    assert "overall: PASS" in table and "FAIL" not in table


def test_host_profile_keeps_what_the_host_did_across_unit_restarts(tmp_path: Path, tls: tuple[Path, Path],
                                                                   remote: RemoteTarget) -> None:
    cfg = replace(_config(tmp_path, tls[0], remote), remotes=())
    with running_unit(cfg.state_dir, STATUS):
        run_selftest(cfg)
    restarted = {**STATUS, "scsi": {"commands": {"READ_10": 5, "UNMAP": 2}, "transfer_sizes": {}, "flushes": 0}}
    with running_unit(cfg.state_dir, restarted):
        report = run_selftest(cfg)
    prof = report.by_name("host profile").data["profile"]
    assert prof["commands"] == {"INQUIRY": 3, "READ_10": 120, "SYNCHRONIZE_CACHE_10": 4, "UNMAP": 2,
                                "WRITE_10": 40}
    assert prof["flushes"] == 4


def test_no_udc_is_reported(tmp_path: Path, tls: tuple[Path, Path], remote: RemoteTarget) -> None:
    cfg = replace(_config(tmp_path, tls[0], remote, udc=False), remotes=())
    with running_unit(cfg.state_dir, STATUS):
        report = run_selftest(cfg)
    udc = report.by_name("udc")
    assert udc.verdict is Verdict.FAIL and "no USB device controller" in udc.detail
    assert not report.ok
    assert "overall: FAIL" in report.render()


def test_named_udc_missing_and_unbound_gadget(tmp_path: Path, tls: tuple[Path, Path], remote: RemoteTarget) -> None:
    cfg = replace(_config(tmp_path, tls[0], remote), remotes=(), gadget="3f980000.usb")
    assert run_selftest(cfg).by_name("udc").verdict is Verdict.FAIL
    cfg = replace(cfg, gadget="fe980000.usb")
    (cfg.configfs_root / "usb_gadget/usbmirror/UDC").write_text("\n")
    binding = run_selftest(cfg).by_name("gadget binding")
    assert binding.verdict is Verdict.FAIL and "unbound" in binding.detail


def test_unreachable_remote(tmp_path: Path, tls: tuple[Path, Path]) -> None:
    dead = RemoteTarget("127.0.0.1", free_port(), "r1")
    cfg = _config(tmp_path, tls[0], dead)
    with running_unit(cfg.state_dir, STATUS):
        report = run_selftest(cfg)
    reach = report.by_name(f"remote {dead.label} reach")
    assert reach.verdict is Verdict.FAIL and "unreachable" in reach.detail
    assert not report.ok


def test_wrong_certificate(tmp_path: Path, tls: tuple[Path, Path], remote: RemoteTarget) -> None:
    cfg = _config(tmp_path, tls[1], remote)  # files from another pairing
    with running_unit(cfg.state_dir, STATUS):
        report = run_selftest(cfg)
    check = report.by_name(f"remote {remote.label} TLS")
    assert check.verdict is Verdict.FAIL and "wrong certificate" in check.detail
    assert not report.ok


def test_source_the_remote_does_not_serve(tmp_path: Path, tls: tuple[Path, Path], remote: RemoteTarget) -> None:
    cfg = replace(_config(tmp_path, tls[0], remote), source_id="site-b")
    with running_unit(cfg.state_dir, STATUS):
        report = run_selftest(cfg)
    assert report.by_name(f"remote {remote.label} TLS").verdict is Verdict.PASS
    target = report.by_name(f"remote {remote.label} target")
    assert target.verdict is Verdict.FAIL and "UNKNOWN_SOURCE" in target.detail


def test_read_only_journal(tmp_path: Path, tls: tuple[Path, Path], remote: RemoteTarget) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({mounted.stderr.strip()}): read-only journal untested")
    try:
        cfg = replace(_config(tmp_path, tls[0], remote), remotes=(), journal=ro / "journal")
        with running_unit(cfg.state_dir, STATUS):
            report = run_selftest(cfg)
        journal = report.by_name("journal device")
        assert journal.verdict is Verdict.FAIL and "read-only" in journal.detail
        assert not report.ok
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_journal_without_room_or_directory(tmp_path: Path, tls: tuple[Path, Path], remote: RemoteTarget) -> None:
    cfg = replace(_config(tmp_path, tls[0], remote), remotes=(), journal=tmp_path / "nowhere" / "journal")
    assert "does not exist" in run_selftest(cfg).by_name("journal device").detail
    cfg = replace(cfg, journal=cfg.state_dir / "journal", journal_size=1 << 60)
    j = run_selftest(cfg).by_name("journal device")
    assert j.verdict is Verdict.FAIL and "needs" in j.detail


def test_unit_not_running(tmp_path: Path, tls: tuple[Path, Path], remote: RemoteTarget) -> None:
    cfg = replace(_config(tmp_path, tls[0], remote), remotes=())
    report = run_selftest(cfg)
    unit = report.by_name("unit running")
    assert unit.verdict is Verdict.FAIL and "no unit answers" in unit.detail


def test_cli_options_become_the_typed_config(tmp_path: Path) -> None:
    class Entry:
        address = ("10.0.0.2", 7373)
        name = "r1"

    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    cfg = config_from_options({"state_dir": str(tmp_path), "gadget": "", "volume": str(img), "size": None,
                               "journal": None, "journal_size": 64 << 20, "source_id": "site-a",
                               "tls_dir": str(tmp_path), "block_size": 512}, [Entry()])
    assert cfg.gadget == "" and cfg.volume_size == 4096 and cfg.remotes == (RemoteTarget("10.0.0.2", 7373, "r1"),)
    assert cfg.journal is None and cfg.journal_size == 64 << 20
