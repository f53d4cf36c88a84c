"""Volume: sparse creation, size checks, read/write/unmap semantics, errors mapped to sense."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from firmware.storage import WriteProtected
from firmware.volume import Volume, VolumeError, parse_size


def test_parse_size() -> None:
    assert parse_size("512") == 512
    assert parse_size("64M") == 64 << 20
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("2g") == 2 << 30
    assert parse_size("3T") == 3 << 40
    for bad in ("", "M", "-1M", "12Q", "1.5G", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_created_sparse_and_zero(tmp_path: Path) -> None:
    p = tmp_path / "disk.img"
    with Volume(p, size=64 << 20) as v:
        assert v.num_blocks == (64 << 20) // 512
        assert v.read(0, 8) == bytes(4096)
    st = os.stat(p)
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20, "volume file should be created sparse"


def test_large_sparse_volume_over_2tib(tmp_path: Path) -> None:
    with Volume(tmp_path / "big.img", size=3 << 40, block_size=4096) as v:
        last = v.num_blocks - 1
        assert last > 1 << 29
        v.write(last, b"\xab" * 4096)
        assert v.read(last, 1) == b"\xab" * 4096


def test_write_read_unmap(tmp_path: Path) -> None:
    with Volume(tmp_path / "d.img", size=1 << 20) as v:
        data = os.urandom(512 * 4)
        v.write(10, data)
        assert v.read(10, 4) == data
        v.unmap(11, 2)
        assert v.read(11, 2) == bytes(1024)
        assert v.read(10, 1) == data[:512] and v.read(13, 1) == data[1536:]


def test_persists_across_reopen(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    with Volume(p, size=1 << 20) as v:
        v.write(5, b"\x5a" * 512, fua=True)
    with Volume(p, size=1 << 20) as v:
        assert v.read(5, 1) == b"\x5a" * 512
    with Volume(p) as v:  # size taken from the file
        assert v.num_blocks == 2048


def test_refuses_to_resize_existing(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    Volume(p, size=1 << 20).close()
    with pytest.raises(VolumeError, match="refusing to resize"):
        Volume(p, size=2 << 20)


def test_bad_geometry(tmp_path: Path) -> None:
    with pytest.raises(VolumeError):
        Volume(tmp_path / "a.img", size=1 << 20, block_size=1024)
    with pytest.raises(VolumeError):
        Volume(tmp_path / "b.img", size=1000)
    with pytest.raises(VolumeError):
        Volume(tmp_path / "missing.img")
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(VolumeError):
        Volume(d)


def test_out_of_range_rejected(tmp_path: Path) -> None:
    with Volume(tmp_path / "d.img", size=1 << 20) as v:
        with pytest.raises(ValueError):
            v.read(2047, 2)
        with pytest.raises(ValueError):
            v.write(2048, bytes(512))


def test_read_only_volume_refuses_writes(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    Volume(p, size=1 << 20).close()
    with Volume(p, read_only=True) as v:
        with pytest.raises(WriteProtected) as ei:
            v.write(0, bytes(512))
        assert (ei.value.sense_key, ei.value.asc) == (0x07, 0x27)


def test_full_disk_behind_sparse_volume_is_space_exhausted(tmp_path: Path) -> None:
    """A sparse image on a full file system: the host must get DATA PROTECT / SPACE ALLOCATION
    FAILED, not a crash and not silent loss."""
    import subprocess

    from firmware.storage import SpaceExhausted

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        with Volume(mnt / "d.img", size=8 << 20) as v:
            with pytest.raises(SpaceExhausted) as ei:
                for i in range(16):
                    v.write(i * 1024, os.urandom(512 * 1024))
            assert (ei.value.sense_key, ei.value.asc, ei.value.ascq) == (0x07, 0x27, 0x07)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_volume_in_use_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    with Volume(p, size=1 << 20), pytest.raises(VolumeError, match="in use"):
        Volume(p, size=1 << 20)
    with Volume(p, size=1 << 20):  # released on close
        pass


def test_short_pwrites_still_write_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may write less than asked (a signal, a file system near full): the rest follows."""
    real = os.pwrite
    calls: list[int] = []

    def short(fd: int, data: bytes | memoryview, off: int) -> int:
        calls.append(len(data))
        return real(fd, bytes(memoryview(data)[:1000]), off)  # at most 1000 bytes per call

    payload = bytes(range(256)) * 16  # 8 blocks of 512
    with Volume(tmp_path / "v.img", size=1 << 20) as v:
        monkeypatch.setattr(os, "pwrite", short)
        v.write_nosync(3, payload)
        monkeypatch.setattr(os, "pwrite", real)
        assert v.read(3, 8) == payload
    assert calls == [4096, 3096, 2096, 1096, 96]
