"""`usbmirror expose`: the image of a point served at once over USB/IP (or iSCSI), fixed while the remote keeps
applying; read-only refuses writes with DATA PROTECT; `--writable` writes into a scratch overlay
with its own cap that vanishes at the end, never touching the target or the history."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware import cli
from firmware.history_cli import exposed, run_restore
from host_tests.test_history_restore import Scenario, _remote, point, rec
from host_tests.test_remote_unit import BS, SIZE
from host_tests.units import REPO
from host_tests.usbip_support import UA_RESET, UsbipClient

WRITE_PROTECTED = (0x7, 0x27, 0x00)
SPACE_FULL = (0x7, 0x27, 0x07)
STEP = 64  # blocks per READ(10)


@pytest.fixture
def sc(tmp_path: Path) -> Iterator[Scenario]:
    with _remote(tmp_path) as ru:
        s = Scenario(ru)
        yield s
        s.src.close()


def _client(port: int) -> UsbipClient:
    c = UsbipClient("127.0.0.1", port)
    assert c.import_device("1-1").status == 0
    c.enumerate()
    assert c.until_ready() == [UA_RESET]
    return c


def _read_all(c: UsbipClient) -> bytes:
    return b"".join(c.read10(lba, STEP) for lba in range(0, SIZE // BS, STEP))


def test_exposed_image_is_the_point_and_stays_fixed_while_replication_goes_on(sc: Scenario) -> None:
    with exposed(sc.state, "s1", ("127.0.0.1", 0), mark="good") as ex, _client(ex.address[1]) as c:
        assert c.read_capacity() == (SIZE // BS, BS)
        first = c.read10(0, 8)  # the first read comes before any copy
        assert first == sc.images[2][:8 * BS]
        sc.batch(6, rec(7, 0, 9, 2048), point(8, "later"))  # the source rewrites the whole disk
        assert _read_all(c) == sc.images[2]
        sc.batch(8, rec(9, 0, 10, 2048))
        assert _read_all(c) == sc.images[2]
        assert c.write10(0, b"\x55" * BS) == 1
        assert c.request_sense() == WRITE_PROTECTED
        assert sc.target.read_bytes() == sc.images[9]
    assert "read-only" in ex.line() and "the target and the history are unchanged" in ex.end_line()


def test_writable_exposure_writes_vanish_and_never_touch_target_or_history(sc: Scenario, tmp_path: Path) -> None:
    target_before = sc.target.read_bytes()
    with exposed(sc.state, "s1", ("127.0.0.1", 0), seq=4, writable=True, scratch_cap=16 * BS) as ex, \
            _client(ex.address[1]) as c:
        assert c.write10(3, b"\xaa" * (4 * BS)) == 0
        assert c.read10(0, 8) == sc.images[4][:3 * BS] + b"\xaa" * (4 * BS) + sc.images[4][7 * BS:8 * BS]
        sc.batch(6, rec(7, 0, 9, 16))  # replication goes on underneath
        assert c.read10(0, 8) == sc.images[4][:3 * BS] + b"\xaa" * (4 * BS) + sc.images[4][7 * BS:8 * BS]
        assert c.write10(100, b"\xbb" * (12 * BS)) == 0  # 16 blocks of scratch now in use
        assert c.write10(200, b"\xcc" * BS) == 1
        assert c.request_sense() == SPACE_FULL
        assert c.write10(3, b"\xdd" * BS) == 0  # a block already in the overlay needs no more room
        assert ex.store.scratch_used == 16 * BS
        assert sc.target.read_bytes() == sc.images[7] != target_before
    assert not list(Path(sc.state).glob(".expose-scratch-*"))
    with exposed(sc.state, "s1", ("127.0.0.1", 0), seq=4) as ex2, _client(ex2.address[1]) as c2:
        assert _read_all(c2) == sc.images[4]  # the writes are gone
    run_restore(sc.state, "s1", str(tmp_path / "m.img"), mark="good")
    assert (tmp_path / "m.img").read_bytes() == sc.images[2]  # the history holds every point as before


def test_bad_points_are_clear_errors(sc: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["expose", "--state-dir", sc.state, "--source", "s1", "--mark", "nope",
                     "--usbip", "127.0.0.1:0"]) == 1
    assert "no mark 'nope' in the history" in capsys.readouterr().err
    assert cli.main(["expose", "--state-dir", sc.state, "--source", "s9", "--seq", "2",
                     "--usbip", "127.0.0.1:0"]) == 1
    assert "no history for source 's9'" in capsys.readouterr().err
    assert cli.main(["expose", "--state-dir", sc.state, "--source", "s1", "--seq", "2",
                     "--usbip", "nowhere"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_expose_over_iscsi_serves_the_same_fixed_image(sc: Scenario) -> None:
    with exposed(sc.state, "s1", None, mark="good", iscsi=("127.0.0.1", 0)) as ex:
        assert ex.address is None and ex.iscsi_address is not None
        assert ex.iscsi_target.startswith("iqn.2026-01.net.usbmirror:image-")
        assert "over iSCSI on 127.0.0.1:" in ex.line() and "USB/IP" not in ex.line()
        from host_tests.iscsi_support import SocketInitiator

        r = SocketInitiator(ex.iscsi_address[1], ex.iscsi_target)
        try:
            sc.batch(6, rec(7, 0, 9, 2048), point(8, "later"))  # the source rewrites the whole disk
            image = b""
            for lba in range(0, SIZE // BS, STEP):
                status, data, _ = r.command(bytes([0x28, 0]) + lba.to_bytes(4, "big") + bytes([0, 0, STEP, 0]),
                                            read=STEP * BS)
                assert status == 0
                image += data
            assert image == sc.images[2]
            status, _, sense = r.command(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), data=b"\x55" * BS)
            assert status == 0x02 and (sense[2] & 0x0F, sense[12], sense[13]) == WRITE_PROTECTED
        finally:
            r.close()
    assert sc.target.read_bytes() == sc.images[max(sc.images)]  # the target moved on; the image did not


def test_expose_needs_somewhere_to_serve(sc: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["expose", "--state-dir", sc.state, "--source", "s1", "--seq", "2"]) == 2
    assert "give --usbip HOST:PORT, --iscsi HOST:PORT or both" in capsys.readouterr().err
    assert cli.main(["expose", "--state-dir", sc.state, "--source", "s1", "--seq", "2", "--iscsi", "nowhere"]) == 2


def test_expose_command_serves_until_sigterm(sc: Scenario) -> None:
    p = subprocess.Popen([sys.executable, "-m", "firmware.cli", "expose", "--state-dir", sc.state, "--source", "s1",
                          "--mark", "good", "--usbip", "127.0.0.1:0", "--writable", "--scratch-size", "1M"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("exposing source s1 at mark 'good' (seq 2) over USB/IP on 127.0.0.1:"), \
            line + (p.stderr.read() if p.stderr else "")
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with _client(port) as c:
            assert c.read10(0, 8) == sc.images[2][:8 * BS]
            assert c.write10(0, b"\x11" * BS) == 0
        os.kill(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "ended: " in out and "512 B of scratch thrown away" in out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_expose_command_over_iscsi_with_chap_until_sigterm(sc: Scenario) -> None:
    import shutil

    from host_tests.iscsi_support import LoginRefused, SocketInitiator

    chap = ("tester", "a-long-secret-2")
    p = subprocess.Popen([sys.executable, "-m", "firmware.cli", "expose", "--state-dir", sc.state, "--source", "s1",
                          "--seq", "4", "--iscsi", "127.0.0.1:0", "--iscsi-chap", ":".join(chap)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("exposing source s1 at seq 4 over iSCSI on 127.0.0.1:"), \
            line + (p.stderr.read() if p.stderr else "")
        assert "(CHAP) (read-only)" in line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        iqn = line.split(" target ")[1].split()[0]
        # an outside initiator (libiscsi) logs in with the secret, and not without it
        if shutil.which("iscsi-readcapacity16") is None:
            pytest.fail("iscsi-readcapacity16 missing: `make setup` installs Debian's libiscsi-bin")
        rc = subprocess.run(["iscsi-readcapacity16", "-s", f"iscsi://{chap[0]}%{chap[1]}@127.0.0.1:{port}/{iqn}/0"],
                            capture_output=True, text=True, timeout=30)
        assert rc.returncode == 0 and rc.stdout.strip() == str(SIZE), rc.stdout + rc.stderr
        with pytest.raises(LoginRefused):
            SocketInitiator(port, iqn)
        with SocketInitiator(port, iqn, chap=chap) as ini:
            assert ini.read10(0, SIZE // BS) == sc.images[4]
            status, sense = ini.write10(0, b"\x11" * BS)
            assert status == 0x02 and (sense[2] & 0x0F, sense[12], sense[13]) == WRITE_PROTECTED
        os.kill(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "ended: " in out and "the target and the history are unchanged" in out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert cli.main(["expose", "--state-dir", sc.state, "--source", "s1", "--seq", "4", "--usbip", "127.0.0.1:0",
                     "--iscsi-chap", ":".join(chap)]) == 2
    assert cli.main(["expose", "--state-dir", sc.state, "--source", "s1", "--seq", "4", "--iscsi", "127.0.0.1:0",
                     "--iscsi-chap", "x:short"]) == 2
