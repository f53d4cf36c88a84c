"""Faults on the journey link, each ending with nothing lost and nothing applied twice: the link
dropped mid-batch, a partition, the remote restarting, the local unit restarting, frames corrupted
in flight (with and without TLS), the remote's disk filling up and being freed."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.remote_unit import RemoteUnit
from firmware.storage import SpaceExhausted
from firmware.volume import Volume
from host_tests.linkkit import FaultProxy, wait_until
from host_tests.test_replicator_e2e import BS, Rig, random_writes, rig, tls_dir

__all__ = ["rig", "tls_dir"]  # fixtures shared with the end-to-end tests


@pytest.fixture
def plain_rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, None)
    yield r
    r.close()


def applied_total(*remotes: RemoteUnit) -> int:
    return sum(r.targets["src-a"].records_applied for r in remotes)


def assert_exact(rig: Rig, applied: int) -> None:
    """The target equals the local volume and every record was applied exactly once."""
    assert rig.same()
    assert applied == rig.journal.head_seq


def big_writes(rig: Rig, n: int, rng: random.Random) -> None:
    for _ in range(n):
        count = rng.randint(64, 256)
        lba = rng.randrange(0, rig.unit.num_blocks - count)
        rig.unit.write(lba, rng.randbytes(count * BS))


def test_link_dropped_mid_batch(rig: Rig) -> None:
    rng = random.Random(10)
    remote = rig.start_remote()
    with FaultProxy(("127.0.0.1", rig.port)) as proxy:
        proxy.drop_after_bytes = 300_000  # inside the first megabyte-sized batches
        rep = rig.start_rep(port=proxy.port)
        rig.wait_streaming()
        big_writes(rig, 40, rng)
        rig.drain()
        assert proxy.resets == 1 and proxy.connections >= 2
        proxy.drop_after_bytes = 1_000_000
        big_writes(rig, 40, rng)
        rig.drain()
        assert proxy.resets == 2
    assert_exact(rig, applied_total(remote))
    assert rep.links[0].connects >= 3


def test_network_partition_then_heal(rig: Rig) -> None:
    rng = random.Random(11)
    remote = rig.start_remote()
    with FaultProxy(("127.0.0.1", rig.port)) as proxy:
        rep = rig.start_rep(port=proxy.port)
        rig.wait_streaming()
        random_writes(rig.unit, 50, rng)
        rig.drain()
        proxy.blackhole = True  # packets vanish; no FIN, no RST
        random_writes(rig.unit, 50, rng)
        wait_until(lambda: rep.links[0].state.name != "STREAMING", what="partition detected by heartbeats")
        # the heartbeats found it (no FIN, no RST: only the silence tells)
        assert "nothing heard from the remote" in rep.links[0].last_error, rep.links[0].last_error
        assert rep.links[0].acked_seq < rig.journal.head_seq  # the journal kept what the remote lacks
        proxy.blackhole = False
        proxy.cut_all()
        rig.drain()
    assert_exact(rig, applied_total(remote))


def test_remote_restart(rig: Rig) -> None:
    rng = random.Random(12)
    first = rig.start_remote()
    rig.start_rep()
    rig.wait_streaming()
    big_writes(rig, 30, rng)
    rig.stop_remote()  # maybe in the middle of applying
    random_writes(rig.unit, 50, rng)  # the local unit keeps journaling
    second = rig.start_remote()
    random_writes(rig.unit, 50, rng)
    rig.drain()
    assert_exact(rig, applied_total(first, second))


def test_local_unit_restart(rig: Rig) -> None:
    rng = random.Random(13)
    remote = rig.start_remote()
    rig.start_rep()
    rig.wait_streaming()
    big_writes(rig, 30, rng)
    rig.stop_rep()  # killed with batches in flight
    big_writes(rig, 10, rng)
    rig.start_rep()
    random_writes(rig.unit, 50, rng)
    rig.drain()
    assert_exact(rig, applied_total(remote))


def test_frames_corrupted_in_flight_plaintext_crc(plain_rig: Rig) -> None:
    rig = plain_rig
    rng = random.Random(14)
    remote = rig.start_remote()
    with FaultProxy(("127.0.0.1", rig.port)) as proxy:
        proxy.corrupt_at = 200_000  # a byte inside a batch: the CRC32C catches it
        rep = rig.start_rep(port=proxy.port)
        rig.wait_streaming()
        big_writes(rig, 30, rng)
        rig.drain()
        assert proxy.corrupt_at is None
        assert rep.links[0].connects >= 2  # detected, connection reset, resumed
        proxy.corrupt_reply_at = 50  # and a byte of the remote's replies
        proxy.cut_all()
        big_writes(rig, 10, rng)
        rig.drain()
    assert_exact(rig, applied_total(remote))
    assert "CRC32C mismatch on a BATCH frame" in remote.targets["src-a"].last_error
    assert any("CRC32C mismatch on a HELLO_REPLY frame" in e for e in rep.status()["remotes"][0]["recent_errors"])


def test_frames_corrupted_in_flight_tls(rig: Rig) -> None:
    rng = random.Random(15)
    remote = rig.start_remote()
    with FaultProxy(("127.0.0.1", rig.port)) as proxy:
        proxy.corrupt_at = 200_000  # TLS record MAC fails: the connection is reset and resumed
        rep = rig.start_rep(port=proxy.port)
        rig.wait_streaming()
        big_writes(rig, 30, rng)
        rig.drain()
        assert proxy.corrupt_at is None and rep.links[0].connects >= 2
    assert_exact(rig, applied_total(remote))


class FillableVolume(Volume):
    """A target whose backing store is 'full' while `full` is set (ENOSPC as the kernel reports it)."""

    full = False

    def write_nosync(self, lba: int, data: bytes) -> None:
        if FillableVolume.full:
            raise SpaceExhausted(f"write lba={lba}: No space left on device")
        super().write_nosync(lba, data)


def test_remote_disk_full_then_freed_simulated(rig: Rig) -> None:
    rng = random.Random(16)
    FillableVolume.full = False
    remote = rig.start_remote(volume_factory=lambda p, size, bs: FillableVolume(p, size=size, block_size=bs))
    rep = rig.start_rep()
    rig.wait_streaming()
    random_writes(rig.unit, 30, rng)
    rig.drain()
    FillableVolume.full = True
    random_writes(rig.unit, 30, rng)
    wait_until(lambda: rep.links[0].state.name == "TARGET_ERROR", what="source to hear the target is full")
    assert "TARGET_FULL" in rep.status()["remotes"][0]["last_error"]
    assert "TARGET_FULL" in remote.status()["sources"][0]["last_error"]
    random_writes(rig.unit, 30, rng)  # the local unit keeps journaling
    assert rep.links[0].acked_seq < rig.journal.head_seq
    FillableVolume.full = False  # space freed
    rig.drain()
    assert_exact(rig, applied_total(remote))


@pytest.mark.slow
def test_remote_disk_full_then_freed_real_tmpfs(rig: Rig, tmp_path: Path) -> None:
    """A real ENOSPC: the target is a sparse image on a tmpfs smaller than the volume."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the simulated disk-full test covers the logic)")
    try:
        rng = random.Random(17)
        rig.target = mnt / "target.img"
        remote = rig.start_remote()
        rep = rig.start_rep()
        rig.wait_streaming()
        big_writes(rig, 40, rng)  # ~6 MB of writes over a 4 MiB volume on a 1 MiB disk
        wait_until(lambda: rep.links[0].state.name == "TARGET_ERROR", what="ENOSPC reported to the source")
        assert "TARGET_FULL" in rep.status()["remotes"][0]["last_error"]
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        rig.drain()
        assert_exact(rig, applied_total(remote))
    finally:
        rig.stop_rep()
        rig.stop_remote()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


_REMOTE_PROC = """
import sys, logging
sys.path.insert(0, sys.argv[1])
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
logging.basicConfig(level=logging.WARNING)
ru = RemoteUnit(RemoteUnitConfig(("127.0.0.1", int(sys.argv[2])), "r1", {"src-a": sys.argv[3]}, sys.argv[4],
                                 sys.argv[5], heartbeat_timeout_s=5))
ru.start()
print(ru.port, flush=True)
sys.stdin.read()
"""


def _spawn_remote(rig: Rig, port: int) -> tuple[subprocess.Popen[str], int]:
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _REMOTE_PROC, str(Path(__file__).resolve().parents[1]),
                             str(port), str(rig.target), str(rig.tls_dir), str(rig.tmp / "rstate")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_remote_killed_hard_mid_stream(rig: Rig) -> None:
    """SIGKILL of the remote process while it applies: on restart it resumes from its durable
    position; records it had applied but not made durable are applied again (same bytes)."""
    rng = random.Random(18)
    proc, port = _spawn_remote(rig, 0)
    try:
        rig.port = port
        rep = rig.start_rep()
        rig.wait_streaming()
        big_writes(rig, 60, rng)
        proc.kill()  # no chance to flush or save anything
        proc.wait()
        big_writes(rig, 20, rng)
        assert rep.links[0].acked_seq < rig.journal.head_seq
        proc, _ = _spawn_remote(rig, port)
        rig.drain()
        assert rig.same()
        import json

        state = json.loads((rig.tmp / "rstate" / "src-a.json").read_text())
        assert state["applied_seq"] == rig.journal.head_seq
    finally:
        rig.stop_rep()
        proc.kill()
        proc.wait()
