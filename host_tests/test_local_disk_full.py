"""The local volume is a sparse image on a file system that fills up: the host's WRITE fails with DATA
PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (27h/07) through USB/IP, BOT and the SCSI target;
acknowledged writes stay readable, no journal record is lost or applied twice, and writes resume
when space returns (here a real tmpfs, mounted small and then grown)."""

from __future__ import annotations

import os
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.journal import Journal
from firmware.local_unit import LocalUnit
from firmware.scsi import ScsiTarget, naa_locally_assigned
from firmware.volume import Volume
from gadget.descriptors import DeviceIdentity, Speed
from gadget.usbip_server import UsbipServer
from host_tests.usbip_support import UA_RESET, UsbipClient

BS = 512
SIZE = 8 << 20  # the volume's size; the file system under it holds 1 MiB at first
CHUNK = 64 * 1024
UNIT = uuid.UUID("0badf00d-0000-4000-8000-00000000d15c")
IDENT = DeviceIdentity(serial="0BADF00D0000400080000000", vendor_id=0x1209, product_id=0x0001)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}): a full file system needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def request_sense(c: UsbipClient) -> tuple[int, int, int]:
    out = c.scsi(bytes([0x03, 0, 0, 0, 18, 0]), data_in=18)
    assert out.csw_status == 0
    return out.data[2] & 0x0F, out.data[12], out.data[13]


def sync_cache(c: UsbipClient) -> int:
    return c.scsi(struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0)).csw_status


def chunk(i: int) -> bytes:
    return (struct.pack(">I", i) * (CHUNK // 4))


def test_full_local_volume_fails_writes_with_27_07_then_resumes(tmp_path: Path, small_fs: Path) -> None:
    vol_path, jpath = small_fs / "local.img", tmp_path / "journal.bin"
    acked: dict[int, bytes] = {}  # lba -> data the host was told is written
    with Volume(vol_path, size=SIZE, block_size=BS) as vol, \
            Journal.open(jpath, size=4 << 20, unit_uuid=UNIT, block_size=BS) as journal, \
            LocalUnit(vol, journal, bitmap_path=str(tmp_path / "bitmap")) as unit:
        target = ScsiTarget(unit, serial=IDENT.serial, device_id=naa_locally_assigned(UNIT.bytes))
        with UsbipServer.for_logical_unit(target, IDENT, speed=Speed.HIGH) as srv, \
                UsbipClient("127.0.0.1", srv.port) as c:
            assert c.import_device("1-1").status == 0
            c.enumerate()
            assert c.until_ready() == [UA_RESET]  # the power-on unit attention, as a host sees it first
            failed_at = None
            for i in range(SIZE // CHUNK):
                lba = i * (CHUNK // BS)
                if c.write10(lba, chunk(i)) != 0:
                    failed_at = i
                    break
                acked[lba] = chunk(i)
            assert failed_at is not None, "a 1 MiB file system took 8 MiB"
            assert request_sense(c) == (0x07, 0x27, 0x07)
            st = unit.status()
            assert st["volume_full"] is True and st["records_waiting_for_space"] >= 1
            # still full: the next write is refused the same way, not with a medium error
            assert c.write10((failed_at + 1) * (CHUNK // BS), chunk(failed_at + 1)) != 0
            assert request_sense(c) == (0x07, 0x27, 0x07)
            assert sync_cache(c) == 0  # everything acknowledged is durable in the journal
            for lba, data in acked.items():  # acknowledged writes are all readable
                assert c.read10(lba, CHUNK // BS) == data
            subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
            for i in range(failed_at, SIZE // CHUNK):  # space is back: writes go on
                lba = i * (CHUNK // BS)
                assert c.write10(lba, chunk(i + 1000)) == 0, i
                acked[lba] = chunk(i + 1000)
            assert sync_cache(c) == 0
            assert unit.status()["volume_full"] is False
            assert unit.status()["volume_full_events"] == 1
            for lba, data in acked.items():
                assert c.read10(lba, CHUNK // BS) == data
    # after a clean shut-down the volume holds every acknowledged write: the record of the refused
    # write was applied once, in order, and never over the newer data written at its place
    img = vol_path.read_bytes()
    for lba, data in acked.items():
        assert img[lba * BS:lba * BS + CHUNK] == data, lba
    # and a restart replays nothing older over it
    with Volume(vol_path, size=SIZE, block_size=BS) as vol, \
            Journal.open(jpath, size=None, unit_uuid=UNIT, block_size=BS) as journal, \
            LocalUnit(vol, journal, bitmap_path=str(tmp_path / "bitmap")) as unit:
        for lba, data in acked.items():
            assert unit.read(lba, CHUNK // BS) == data
    os.sync()


def test_full_volume_with_write_cache_on_keeps_acknowledged_writes(tmp_path: Path, small_fs: Path) -> None:
    """With the write cache on a WRITE is acknowledged from RAM; the volume's ENOSPC then shows on a
    later command, and what was acknowledged survives in the journal until space returns."""
    vol_path = small_fs / "local.img"
    acked: dict[int, bytes] = {}
    with Volume(vol_path, size=SIZE, block_size=BS) as vol, \
            Journal.open(tmp_path / "j.bin", size=8 << 20, unit_uuid=UNIT, block_size=BS) as journal, \
            LocalUnit(vol, journal, bitmap_path=str(tmp_path / "bitmap"), write_cache=True) as unit:
        refused = 0
        from firmware.storage import SpaceExhausted

        for i in range(SIZE // CHUNK):
            lba = i * (CHUNK // BS)
            try:
                unit.write(lba, chunk(i))
                acked[lba] = chunk(i)
            except SpaceExhausted:
                refused += 1
            if i % 4 == 3:
                unit.flush()
        assert refused > 0 and unit.status()["volume_full"] is True
        for lba, data in acked.items():
            assert unit.read(lba, CHUNK // BS) == data
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
        unit.flush()
        assert unit.status()["volume_full"] is False
    img = vol_path.read_bytes()
    for lba, data in acked.items():
        assert img[lba * BS:lba * BS + CHUNK] == data, lba
