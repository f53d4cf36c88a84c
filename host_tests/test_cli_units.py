"""`usbmirror local` and `usbmirror remote` as real processes, as an operator runs them.

Writes go through USB/IP with the raw test client, so data really passes the BOT/SCSI stack, the
journal and the TLS link. Covered: status text and JSON keys, TOML config files with `[[remote]]`
and `[targets]` tables, clean SIGTERM, a second unit on the same state dir, bad volume options, a
source the remote does not know, and the exit codes of `usbmirror verify`.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_tests.units import (
    UnitProcess,
    Units,
    drained,
    first_difference,
    free_port,
    streaming,
    usbmirror,
)
from host_tests.usbip_support import UA_RESET, UsbipClient

BS = 512
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
VOLUME_SIZE = 16 << 20


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    with Units(tmp_path) as u:
        yield u


def attach(unit: UnitProcess) -> UsbipClient:
    c = UsbipClient("127.0.0.1", unit.port)
    reply = c.import_device("1-1")
    assert reply.device is not None, "the local unit refused to export busid 1-1"
    c.enumerate()
    assert c.until_ready() == [UA_RESET]  # the configuration is a reset for the disk, as a host expects
    return c


def write_random(c: UsbipClient, rng: random.Random, writes: int, *, max_blocks: int = 64) -> dict[int, bytes]:
    """WRITE(10)s of random data at random LBAs; returns lba -> data of the last write per LBA run."""
    written: dict[int, bytes] = {}
    total = VOLUME_SIZE // BS
    for _ in range(writes):
        n = rng.randint(1, max_blocks)
        lba = rng.randrange(0, total - n)
        data = rng.randbytes(n * BS)
        assert c.write10(lba, data) == 0, f"WRITE(10) lba={lba} blocks={n} failed"
        for i in range(n):
            written[lba + i] = data[i * BS:(i + 1) * BS]
    return written


def read_file_block(path: Path, lba: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(lba * BS)
        return f.read(BS)


def pair_and_start(units: Units, tmp_path: Path, *, mode: str = "async") -> tuple[UnitProcess, UnitProcess, Path]:
    tls = units.pair("dr1", ["server1"])
    target = tmp_path / "target.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    spec = remote.address + ("" if mode == "async" else f",mode={mode}")
    local = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[spec])
    local.wait_status(streaming(), what="the link to the remote")
    return local, remote, target


def test_status_keys_replication_and_byte_identical_copy(units: Units, tmp_path: Path) -> None:
    local, remote, target = pair_and_start(units, tmp_path)
    before = local.status()
    rng = random.Random(1)
    with attach(local) as c:
        assert c.read_capacity() == (VOLUME_SIZE // BS, BS)
        written = write_random(c, rng, 60)
        for lba in rng.sample(sorted(written), 20):
            assert c.read10(lba, 1) == written[lba], f"read back lba={lba} differs"
    st = local.wait_status(drained, what="the remote to acknowledge every record", timeout=120)

    j = st["journal"]
    for key in ("capacity_bytes", "used_bytes", "head_seq", "tail_seq", "overflow"):
        assert key in j, f"journal.{key} missing from status --json: {sorted(j)}"
    assert j["capacity_bytes"] > 30 << 20            # a 32M journal file minus its metadata
    assert 0 < j["used_bytes"] <= j["capacity_bytes"]
    assert j["head_seq"] >= before["journal"]["head_seq"] + 60, "each WRITE is a journal record"
    assert j["overflow"] is False
    (r,) = st["remotes"]
    for key in ("address", "state", "mode", "acked_seq", "lag_bytes"):
        assert key in r, f"remotes[].{key} missing: {sorted(r)}"
    assert (r["address"], r["state"], r["mode"]) == (remote.address, "streaming", "async")
    assert r["acked_seq"] >= j["durable_seq"] and r["lag_bytes"] == 0

    text = local.status_raw(text=True)
    assert text.returncode == 0, text.stderr
    assert "journal" in text.stdout and f"head seq {j['head_seq']}" in text.stdout
    assert remote.address in text.stdout and "streaming" in text.stdout and "mode async" in text.stdout

    rst = remote.status()
    (src,) = rst["sources"]
    assert src["source_id"] == "server1" and Path(src["target"]) == target
    assert src["applied_seq"] >= j["durable_seq"]
    rtext = remote.status_raw(text=True)
    assert rtext.returncode == 0 and "server1" in rtext.stdout, rtext.stderr
    for unit_st, unit_text in ((st, text.stdout), (rst, rtext.stdout)):  # fresh certificates: no warning
        assert unit_st["cert_expires"] and unit_st["warnings"] == []
        assert f"certificate valid until {unit_st['cert_expires']}" in unit_text

    v = usbmirror("verify", "--state-dir", str(local.state_dir), timeout=120)
    assert v.returncode == 0 and "MATCH" in v.stdout, v.stdout + v.stderr + units.describe()
    assert local.stop() == 0 and remote.stop() == 0, units.describe()
    diff = first_difference(tmp_path / "volume.img", target)
    assert diff is None, f"remote target differs from the local volume at byte {diff}\n{units.describe()}"
    for lba, data in list(written.items())[:50]:
        assert read_file_block(target, lba) == data


def test_config_files_remote_tables_targets_table_and_sync_mode(units: Units, tmp_path: Path) -> None:
    tls = units.pair("dr1", ["server1"])
    target = tmp_path / "dr1-server1.img"
    rport, uport = free_port(), free_port()
    rstate, lstate = tmp_path / "rstate", tmp_path / "lstate"
    (tmp_path / "remote.toml").write_text(
        f'listen = "127.0.0.1:{rport}"\nname = "dr1"\ntls-dir = "{tls}"\nstate-dir = "{rstate}"\n'
        f'[targets]\nserver1 = "{target}"\n')
    (tmp_path / "local.toml").write_text(
        f'volume = "{tmp_path / "volume.img"}"\nsize = "16M"\njournal = "{tmp_path / "journal"}"\n'
        f'journal-size = "16M"\nusbip = "127.0.0.1:{uport}"\nstate_dir = "{lstate}"\n'
        f'source-id = "server1"\ntls_dir = "{tls}"\n'
        f'[[remote]]\naddress = "127.0.0.1:{rport}"\nmode = "sync"\nname = "dr1"\n')
    remote = units.start_argv("remote", ["remote", "--config", str(tmp_path / "remote.toml")], rstate, rport)
    local = units.start_argv("local", ["local", "--config", str(tmp_path / "local.toml")], lstate, uport)
    st = local.wait_status(streaming(), what="the link to the remote")
    (r,) = st["remotes"]
    assert (r["address"], r["mode"]) == (remote.address, "sync")
    assert st["journal"]["capacity_bytes"] <= 16 << 20, "journal-size from the config file"
    assert st["volume"]["size_bytes"] == VOLUME_SIZE

    rng = random.Random(2)
    with attach(local) as c:
        for i in range(10):
            data = rng.randbytes(8 * BS)
            assert c.write10(1000 + 8 * i, data) == 0
            # sync mode: the host hears "done" only once the remote made the write durable
            st = local.status()
            assert st["remotes"][0]["acked_seq"] >= st["journal"]["durable_seq"], (st["remotes"], st["journal"])
            assert read_file_block(target, 1000 + 8 * i) == data[:BS], "acknowledged but not on the remote target"
    (src,) = remote.status()["sources"]
    assert Path(src["target"]) == target
    assert local.stop() == 0 and remote.stop() == 0, units.describe()
    assert first_difference(tmp_path / "volume.img", target) is None


def test_sigterm_stops_cleanly_with_a_host_attached(units: Units, tmp_path: Path) -> None:
    vol = tmp_path / "volume.img"
    local = units.start_local(volume=vol, size="16M")
    tls = units.pair("dr1", ["server1"])
    remote = units.start_remote("dr1", targets={"server1": tmp_path / "t.img"}, tls_dir=tls)
    data = random.Random(3).randbytes(64 * BS)
    client = attach(local)          # the host stays attached while the unit is told to stop
    assert client.write10(4096, data) == 0
    for u in (local, remote):
        sock = u.state_dir / "control.sock"
        assert sock.exists()
        u.signal(signal.SIGTERM)
        assert u.wait_exit(30) == 0, f"{u.role} unit did not exit 0 on SIGTERM:\n{u.log()}"
        assert not sock.exists(), f"{u.role} unit left its control socket behind"
        assert "Traceback" not in u.log()
        r = u.status_raw()
        assert r.returncode != 0 and "no unit is running" in r.stderr
    assert client.closed_by_server(), "the attached host was not disconnected"
    client.close()
    with open(vol, "rb") as f:
        f.seek(4096 * BS)
        assert f.read(len(data)) == data


def test_second_unit_on_the_same_state_dir_is_refused(units: Units, tmp_path: Path) -> None:
    first = units.start_local(volume=tmp_path / "a.img", size="16M")
    second = units.start_local(volume=tmp_path / "b.img", size="16M", state_dir=first.state_dir,
                               journal=tmp_path / "b.journal", wait=False)
    rc = second.wait_exit(60)
    err = second.log().splitlines()[-1]
    assert rc == 2, second.log()
    assert "another unit is already running" in err and str(first.state_dir) in err, err
    assert "Traceback" not in second.log()
    # the first unit is untouched and still answers
    assert first.running() and first.status()["pid"] == first.pid
    assert (first.state_dir / "control.sock").exists()


@pytest.mark.parametrize(
    ("volume", "size", "expect"),
    [
        ("a-file/disk.img", "16M", "volume: "),
        ("disk.img", "12Q", "not a size"),
        ("disk.img", "1000", "not a multiple of the block size"),
        ("absent.img", None, "no size was given"),
        ("a-directory", "16M", "neither a regular file nor a block device"),
    ],
)
def test_bad_volume_gives_one_line_and_exit_2(units: Units, tmp_path: Path, volume: str, size: str | None,
                                              expect: str) -> None:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-file").write_bytes(b"not a directory")
    state = tmp_path / "state"
    argv = units.local_argv(volume=tmp_path / volume, size=size, state_dir=state, port=free_port())
    r = usbmirror(*argv)
    assert r.returncode == 2, r.stderr
    # the daemon's INFO log records may precede it; the error itself is one line, no traceback
    errors = [ln for ln in r.stderr.splitlines() if not LOG_RECORD.match(ln)]
    assert len(errors) == 1 and errors[0].startswith("usbmirror local: "), r.stderr
    assert expect in errors[0], errors[0]
    assert "Traceback" not in r.stderr
    assert not (state / "control.sock").exists(), "a failed start left a control socket"


def test_unknown_source_is_refused_by_the_remote(units: Units, tmp_path: Path) -> None:
    tls = units.pair("dr1", ["server1", "server2"])
    target = tmp_path / "target1.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server2", tls_dir=tls,
                              remotes=[remote.address])
    remote.wait_status(lambda st: st["refused_connections"] >= 1, what="a refused connection")
    (r,) = local.wait_status(lambda st: bool(st["remotes"][0]["last_error"]), what="the refusal")["remotes"]
    assert r["state"] == "refused" and r["acked_seq"] == 0, r
    assert "server2" in r["last_error"], f"the local unit does not say why: {r['last_error']!r}"
    refusals = [ln for ln in remote.log().splitlines() if "refused" in ln]
    assert refusals, remote.log()
    assert any("server2" in ln for ln in refusals), f"the refusal does not name the source:\n{refusals}"
    (src,) = remote.status()["sources"]
    assert src["applied_seq"] == 0 and src["records_applied"] == 0
    # the local unit keeps serving the host meanwhile
    with attach(local) as c:
        assert c.write10(0, bytes(range(256)) * 2) == 0
    assert local.running() and remote.running()


def test_verify_exit_codes(units: Units, tmp_path: Path) -> None:
    r = usbmirror("verify", "--state-dir", str(tmp_path / "nobody"))
    assert r.returncode == 2 and "no unit is running" in r.stderr, r.stderr

    alone = units.start_local(volume=tmp_path / "alone.img", size="16M")
    r = usbmirror("verify", "--state-dir", str(alone.state_dir))
    assert r.returncode == 1, "verify with no remote configured must not claim a match:\n" + r.stdout + r.stderr
    assert alone.stop() == 0

    local, _remote, target = pair_and_start(units, tmp_path)
    with attach(local) as c:
        write_random(c, random.Random(4), 20)
    local.wait_status(drained, what="drain", timeout=120)
    r = usbmirror("verify", "--state-dir", str(local.state_dir), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr + units.describe()

    # damage the remote copy behind the remote unit's back: verify must notice and say where
    bad_lba = 12345
    with open(target, "r+b") as f:
        f.seek(bad_lba * BS)
        old = f.read(BS)
        f.seek(bad_lba * BS)
        f.write(bytes(b ^ 0xFF for b in old))
        f.flush()
        os.fsync(f.fileno())
    r = usbmirror("verify", "--state-dir", str(local.state_dir), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DIFFER" in r.stdout and "lba" in r.stdout, r.stdout
    j = usbmirror("verify", "--state-dir", str(local.state_dir), "--json", timeout=120)
    assert j.returncode == 1
    report = json.loads(j.stdout)
    diffs = report["remotes"][0]["differences"]
    assert any(d["lba"] <= bad_lba < d["lba"] + d["count"] for d in diffs), diffs


def test_kill_9_then_restart_keeps_acknowledged_writes(units: Units, tmp_path: Path) -> None:
    """kill -9 (not a power cut: the page cache survives) right after WRITEs were acknowledged."""
    vol = tmp_path / "volume.img"
    local = units.start_local(volume=vol, size="16M")
    rng = random.Random(5)
    with attach(local) as c:
        written = write_random(c, rng, 40)
        head = local.status()["journal"]["head_seq"]
        local.kill9()
    r = local.status_raw()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot reach the unit" in r.stderr, r.stderr      # stale socket of a dead unit: a clear line
    local.launch()
    st = local.wait_ready()
    assert st["journal"]["recovery"]["created"] is False
    assert st["journal"]["head_seq"] >= head, "records acknowledged before the kill are missing"
    with attach(local) as c:
        for lba, data in written.items():
            assert c.read10(lba, 1) == data, f"lba {lba} lost across kill -9"
    assert local.stop() == 0
    for lba in list(written)[:200]:
        assert read_file_block(vol, lba) == written[lba]


def test_second_unit_on_the_same_volume_is_refused(units: Units, tmp_path: Path) -> None:
    vol = tmp_path / "volume.img"
    units.start_local(volume=vol, size="16M")
    second = units.start_local(volume=vol, size="16M", journal=tmp_path / "other.journal", wait=False)
    deadline = time.monotonic() + 60
    while second.running() and time.monotonic() < deadline:
        assert second.status_raw().returncode != 0, f"a second unit serves the same volume file:\n{second.log()}"
        time.sleep(0.2)
    assert second.wait_exit(5) == 2, second.log()
    assert "volume" in second.log().splitlines()[-1]


@pytest.mark.parametrize("case", ["local-port-busy", "remote-port-busy", "local-tls-missing"])
def test_startup_failures_are_one_line_without_traceback(units: Units, tmp_path: Path, case: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = int(busy.getsockname()[1])
        if case == "local-port-busy":
            u = units.start_local(volume=tmp_path / "v.img", size="16M", port=port, wait=False)
        elif case == "remote-port-busy":
            tls = units.pair("dr1", ["server1"])
            u = units.start_remote("dr1", targets={"server1": tmp_path / "t.img"}, tls_dir=tls, port=port,
                                   wait=False)
        else:
            u = units.start_local(volume=tmp_path / "v.img", size="16M", source_id="server1",
                                  tls_dir=tmp_path / "no-tls", remotes=[f"127.0.0.1:{port}"], wait=False)
        rc = u.wait_exit(60)
    last = u.log().splitlines()[-1]
    assert rc != 0, u.log()
    assert last.startswith(f"usbmirror {u.role}: "), u.log()
    expect = "TLS file" if case == "local-tls-missing" else "Address already in use"
    assert expect in last, last
    assert "Traceback" not in u.log()
    assert not (u.state_dir / "control.sock").exists(), "a failed start left its control socket"


@pytest.mark.parametrize("host_after_outage", ["keeps-writing", "idle"])
def test_journal_overflow_during_outage_then_remote_converges(units: Units, tmp_path: Path,
                                                              host_after_outage: str) -> None:
    """The remote is away long enough for a 2 MiB journal to overflow into the dirty bitmap; once it
    is back the remote must end up identical, whether or not the host writes again."""
    tls = units.pair("dr1", ["server1"])
    target, vol = tmp_path / "target.img", tmp_path / "volume.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=vol, size="16M", journal_size="2M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address])
    local.wait_status(streaming(), what="the link to the remote")
    assert remote.stop() == 0
    with attach(local) as c:
        write_random(c, random.Random(6), 300)
        st = local.status()
        assert st["journal"]["overflow"] is True and st["journal"]["dirty_regions"] > 0, st["journal"]
        remote.launch()
        remote.wait_ready()
        local.wait_status(drained, timeout=60, what="the journaled records to reach the remote")
        if host_after_outage == "keeps-writing":
            write_random(c, random.Random(7), 5)
        local.wait_status(lambda st: st["journal"]["dirty_regions"] == 0 and drained(st)
                          and not st["remotes"][0]["resync"]["active"], timeout=120,
                          what="the dirty regions to reach the remote")
    v = usbmirror("verify", "--state-dir", str(local.state_dir), timeout=120)
    assert v.returncode == 0, f"{v.stdout}{v.stderr}\n{units.describe()}"
    # nothing is dirty and the journal is empty: status must stop reporting an overflow (idle host too)
    local.wait_status(lambda st: st["journal"]["overflow"] is False, timeout=30, what="the overflow flag to clear")
    assert local.stop() == 0 and remote.stop() == 0
    assert first_difference(vol, target) is None


def test_one_source_mirrors_to_two_remotes(units: Units, tmp_path: Path) -> None:
    """An async and a sync remote from one pairing directory (`usbmirror pair` run once per remote)."""
    tls = units.pair("dr1", ["server1"])
    assert units.pair("dr2", ["server1"]) == tls          # the same directory: the CA is reused
    t1, t2, vol = tmp_path / "dr1.img", tmp_path / "dr2.img", tmp_path / "volume.img"
    r1 = units.start_remote("dr1", targets={"server1": t1}, tls_dir=tls)
    r2 = units.start_remote("dr2", targets={"server1": t2}, tls_dir=tls)
    local = units.start_local(volume=vol, size="16M", source_id="server1", tls_dir=tls,
                              remotes=[r1.address, f"{r2.address},mode=sync"])
    st = local.wait_status(lambda st: all(r["state"] == "streaming" for r in st["remotes"]), what="both links")
    assert [(r["address"], r["mode"]) for r in st["remotes"]] == [(r1.address, "async"), (r2.address, "sync")]
    rng = random.Random(8)
    with attach(local) as c:
        write_random(c, rng, 20)
        st = local.status()
        assert st["remotes"][1]["acked_seq"] >= st["journal"]["durable_seq"], "the sync remote lags the host"
        # the async remote goes away: the host keeps writing, the sync remote keeps up
        assert r1.stop() == 0
        written = write_random(c, rng, 20)
        st = local.status()
        assert st["remotes"][1]["acked_seq"] >= st["journal"]["durable_seq"]
        r1.launch()
        local.wait_status(drained, timeout=120, what="both remotes to acknowledge everything")
        for lba in list(written)[:10]:
            assert c.read10(lba, 1) == written[lba]
    v = usbmirror("verify", "--state-dir", str(local.state_dir), timeout=120)
    assert v.returncode == 0 and v.stdout.count("MATCH") == 2, v.stdout + v.stderr + units.describe()
    assert local.stop() == 0 and r1.stop() == 0 and r2.stop() == 0, units.describe()
    assert first_difference(vol, t1) is None and first_difference(vol, t2) is None
