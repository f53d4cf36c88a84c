"""The remote unit killed (SIGKILL) while it applies and trims history: every point it still lists
restores to the image the disk had at that point.

Real `usbmirror local` and `usbmirror remote` processes; a host-side USB/IP client writes 64 KiB
blocks of seeded random data to the local unit and keeps the disk's expected content; every few
writes `usbmirror mark` takes a restore point and the expected image at it is saved. The history
cap is small, so the remote trims after nearly every batch; it is killed right after bursts of
writes (while it applies them, or trims) and started again on the same port. At the end, once
the remote has everything: each mark `usbmirror history` lists is restored and compared with the
saved image byte for byte, and the target with the local volume.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_tests.units import Units, drained, first_difference, streaming, usbmirror
from host_tests.usbip_support import UsbipClient

pytestmark = pytest.mark.slow

MIB = 1 << 20
BS = 512
DISK = 8 * MIB
CHUNK = 64 << 10
MARKS = 14
WRITES_PER_MARK = 6
KILL_AFTER = (1, 3, 5, 7, 9, 11)  # the remote is killed amid the writes of these marks


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    with Units(tmp_path) as u:
        yield u


def test_remote_killed_while_applying_and_trimming_keeps_every_listed_point(units: Units, tmp_path: Path) -> None:
    tls = units.pair("dr1", ["server1"])
    volume, target = tmp_path / "local-volume.img", tmp_path / "remote-target.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, extra=["--history-size", "1M"])
    local = units.start_local(volume=volume, size="8M", source_id="server1", tls_dir=tls, remotes=[remote.address])
    local.wait_status(streaming(), what="the link to the remote")
    rng = random.Random(10)
    disk = bytearray(DISK)
    at_mark: dict[str, bytes] = {}
    kills = 0
    with UsbipClient("127.0.0.1", local.port) as c:
        assert c.import_device("1-1").status == 0
        c.enumerate()
        c.until_ready()
        for m in range(MARKS):
            for i in range(WRITES_PER_MARK):
                off = rng.randrange(DISK // CHUNK) * CHUNK + rng.randrange(4) * 8 * BS
                n = min(CHUNK, DISK - off)
                data = rng.randbytes(n)
                assert c.write10(off // BS, data) == 0
                disk[off:off + n] = data
                if m in KILL_AFTER and i == WRITES_PER_MARK // 2:
                    remote.kill9()   # the records just written are on their way, applied or being trimmed
                    kills += 1
            name = f"m{m}"
            r = usbmirror("mark", name, "--state-dir", str(local.state_dir))
            assert r.returncode == 0, r.stderr
            at_mark[name] = bytes(disk)
            if m in KILL_AFTER:
                remote.launch()  # the same port, state dir and files; the local unit sends again what was unacked
                remote.wait_ready(60)
    st = local.wait_status(drained, timeout=120, what="the remote to have every record")
    assert kills == len(KILL_AFTER) and st["remotes"][0]["connects"] >= 2, st["remotes"][0]  # it came back

    r = usbmirror("history", "--state-dir", str(remote.state_dir), "--source", "server1", "--json")
    assert r.returncode == 0, r.stderr
    hist = json.loads(r.stdout)
    listed = [p["name"] for p in hist["points"] if p["kind"] == "mark"]
    assert hist["size_bytes"] <= hist["size_cap_bytes"] + CHUNK + 48, hist  # at most one record over the cap
    assert len(listed) >= 2 and listed[0] == f"m{MARKS - 1}", listed  # trimmed, and the newest kept
    assert "m0" not in listed, "the 1M cap should have trimmed the oldest marks"
    for name in listed:
        out = tmp_path / f"{name}.img"
        r = usbmirror("restore", "--state-dir", str(remote.state_dir), "--source", "server1", "--mark", name,
                      "--to", str(out), timeout=120)
        assert r.returncode == 0, f"restore {name}: {r.stdout}{r.stderr}\n{units.describe()}"
        got = out.read_bytes()
        assert len(got) == DISK
        if got != at_mark[name]:
            first = next(i for i in range(DISK) if got[i] != at_mark[name][i])
            pytest.fail(f"mark {name} restores differently from the disk at that mark (byte {first}, "
                        f"lba {first // BS})\n{units.describe()}")
    assert local.stop() == 0 and remote.stop() == 0, units.describe()
    assert first_difference(volume, target) is None
