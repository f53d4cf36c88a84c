"""A remote target that is a block device (a loop device standing in for a partition or a whole
disk), larger than the source volume: the mirror lands in its first blocks, byte for byte."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_tests.linkkit import wait_until
from host_tests.test_replicator_e2e import SIZE, Rig, random_writes, tls_dir

__all__ = ["tls_dir"]


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[Path]:
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE * 2)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop devices here ({r.stderr.strip()}); file targets are covered elsewhere")
    dev = Path(r.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


def test_block_device_target(tmp_path: Path, tls_dir: Path, loopdev: Path) -> None:
    rig = Rig(tmp_path, tls_dir)
    try:
        rng = random.Random(60)
        rig.target = loopdev
        remote = rig.start_remote()
        rep = rig.start_rep()
        rig.wait_streaming()
        random_writes(rig.unit, 100, rng)
        rig.drain()
        rig.vol.flush()
        with open(loopdev, "rb") as f:
            on_disk = f.read(SIZE)
        assert on_disk == (tmp_path / "local.img").read_bytes()
        assert remote.status()["sources"][0]["target"] == str(loopdev)
        assert rep.verify()["match"]
        wait_until(lambda: remote.status()["sources"][0]["applied_seq"] == rig.journal.head_seq)
    finally:
        rig.close()
