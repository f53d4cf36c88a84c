"""Debian's stock Linux kernel (in QEMU) uses the usbmirror disk through USB/IP like a server would.

The guest attaches the device with `usbip attach`; its vhci-hcd, usb-storage and sd drivers talk to
our BOT/SCSI implementation. The guest queries it with sg3-utils, writes raw data with O_DIRECT,
partitions it (GPT), makes and checks ext4 and vfat file systems, discards a partition and detaches.
Afterwards the host checks that the image file holds exactly what the guest wrote.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from host_tests.realkernel.conftest import BASIC_DATA, LINUX_FS, RunningDevice, write_gpt
from hw.qemu.build_guest import GuestImage
from hw.qemu.guest import GuestResult, run_guest

pytestmark = [pytest.mark.realkernel, pytest.mark.slow]

MIB = 1 << 20
DISK_SIZE = 64 * MIB
# GPT layout written by the guest, in bytes: (name, offset, size, type GUID)
LAYOUT = (
    ("ext4part", 1 * MIB, 20 * MIB, LINUX_FS),
    ("fatpart", 21 * MIB, 20 * MIB, BASIC_DATA),
    ("scratch", 41 * MIB, 8 * MIB, LINUX_FS),
)
RAW_OFFSET = 52 * MIB          # outside every partition and the backup GPT
RAW_SIZE = 4 * MIB
SMALL_BLOCKS = 7               # written at an odd LBA near 57 MiB


def partitions(bs: int) -> list[tuple[str, int, int, str]]:
    """The layout in logical blocks: (name, first LBA, blocks, type GUID)."""
    return [(name, off // bs, size // bs, guid) for name, off, size, guid in LAYOUT]


def small_lba(bs: int) -> int:
    return 57 * MIB // bs + 3


KNOWN_SIZE = MIB + 12345


def _guest_script(busid: str, bs: int) -> str:
    return f"""
set -u
step attach
usbip attach -r 10.0.2.100 -b {busid} || die attach
d=$(wait_disk 20) || die no-disk-after-attach
mark disk=$d
step sg_inq
sg_inq /dev/$d || die sg_inq
for p in 0x00 0x80 0x83 0xb0 0xb1 0xb2; do
    sg_vpd -p $p /dev/$d || die sg_vpd_$p
done
step sg_readcap
sg_readcap -l /dev/$d > /tmp/cap || {{ cat /tmp/cap; die sg_readcap; }}
cat /tmp/cap
mark blocks=$(sed -n 's/.*Number of logical blocks=\\([0-9]*\\).*/\\1/p' /tmp/cap)
mark block_len=$(sed -n 's/.*Logical block length=\\([0-9]*\\) bytes.*/\\1/p' /tmp/cap)
step sg_modes
sg_modes -a /dev/$d || die sg_modes
step sg_turs
sg_turs -v /dev/$d || die sg_turs
step sg_sync
sg_sync -v /dev/$d || die sg_sync
sd=$(ls -d /sys/block/$d/device/scsi_disk/*)
mark kernel_cache_type=$(cat $sd/cache_type | tr ' ' _) kernel_provisioning=$(cat $sd/provisioning_mode)

step raw
dd if=/pattern.bin of=/dev/$d bs=65536 seek={RAW_OFFSET // 65536} oflag=direct conv=fsync,notrunc || die raw_write
dd if=/dev/$d of=/tmp/back.bin bs=65536 skip={RAW_OFFSET // 65536} count={RAW_SIZE // 65536} iflag=direct \\
    || die raw_read
cmp /pattern.bin /tmp/back.bin || die raw_compare
dd if=/small.bin of=/dev/$d bs={bs} seek={small_lba(bs)} oflag=direct conv=fsync,notrunc || die small_write
dd if=/dev/$d of=/tmp/small.back bs={bs} skip={small_lba(bs)} count={SMALL_BLOCKS} iflag=direct || die small_read
cmp /small.bin /tmp/small.back || die small_compare

step gpt
{write_gpt(partitions(bs))}
sfdisk -d /dev/$d

step mkfs
mkfs.ext4 -q -F -L usbmirror /dev/${{d}}1 || die mkfs_ext4
mkfs.fat -F 16 -s {4096 // bs} -n USBMIRROR /dev/${{d}}2 || die mkfs_fat
mkdir -p /mnt/ext4 /mnt/fat
mount -t ext4 /dev/${{d}}1 /mnt/ext4 || die mount_ext4
mount -t vfat /dev/${{d}}2 /mnt/fat || die mount_vfat

step write_files
for fs in ext4 fat; do
    cp /known.bin /mnt/$fs/KNOWN.BIN || die copy_known_$fs
    mkdir -p /mnt/$fs/tree/sub
    i=0
    while [ $i -lt 40 ]; do
        dd if=/dev/urandom of=/mnt/$fs/tree/f$i bs=1024 count=$((i * 7 + 1)) status=none || die write_$fs
        i=$((i + 1))
    done
    dd if=/dev/urandom of=/mnt/$fs/tree/sub/big bs=65536 count=32 status=none || die write_big_$fs
    df /mnt/$fs
    (cd /mnt/$fs && find . -type f | sort | xargs md5sum) > /tmp/$fs.md5
done
sync
echo 3 > /proc/sys/vm/drop_caches
for fs in ext4 fat; do (cd /mnt/$fs && md5sum -c -s /tmp/$fs.md5) || die verify_after_drop_caches_$fs; done
umount /mnt/ext4 || die umount_ext4
umount /mnt/fat || die umount_fat
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/${{d}}1 /mnt/ext4 || die remount_ext4
mount -t vfat -o ro /dev/${{d}}2 /mnt/fat || die remount_vfat
for fs in ext4 fat; do (cd /mnt/$fs && md5sum -c -s /tmp/$fs.md5) || die verify_after_remount_$fs; done
mark files_verified=$(cat /tmp/ext4.md5 /tmp/fat.md5 | wc -l)
umount /mnt/ext4; umount /mnt/fat

step fsck
e2fsck -f -n /dev/${{d}}1 || die e2fsck
fsck.fat -n /dev/${{d}}2 || die fsck_fat

step discard
dd if=/dev/urandom of=/dev/${{d}}3 bs=65536 count=128 oflag=direct conv=fsync 2>/dev/null || die fill_scratch
dd if=/dev/${{d}}3 bs=65536 iflag=direct 2>/dev/null | cmp -s -n {8 * MIB} - /dev/zero && die scratch_zero_before
mark discard_max_auto=$(cat /sys/block/$d/queue/discard_max_bytes)
if [ "$(cat /sys/block/$d/queue/discard_max_bytes)" = 0 ]; then
    echo unmap > $sd/provisioning_mode || die set_provisioning_unmap
fi
mark discard_max=$(cat /sys/block/$d/queue/discard_max_bytes)
/sbin/blkdiscard -v /dev/${{d}}3 || die blkdiscard
dd if=/dev/${{d}}3 bs=65536 iflag=direct 2>/dev/null | cmp -n {8 * MIB} - /dev/zero || die scratch_not_zero_after_discard

step checksum
mark disk_md5=$(dd if=/dev/$d bs=1048576 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)

step detach
usbip port
usbip detach -p 0 || die detach
n=0; while [ -e /sys/block/$d ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -e /sys/block/$d ] && die disk_still_present_after_detach
check_kernel_log
mark done=1
"""


def _fail(what: str, result: GuestResult, dev: RunningDevice) -> str:
    return f"{what}\n{result.describe()}\n--- device log (tail) ---\n{dev.log()}"


def _kernel_clean(result: GuestResult, dev: RunningDevice) -> None:
    """The guest kernel logged no I/O errors, SCSI failures, USB resets or file-system errors."""
    errors = [line for line in result.output.splitlines() if line.startswith("KERNEL-ERROR: ")]
    assert result.markers.get("kernel_errors") == "0" and not errors, _fail(
        "the guest kernel logged trouble with the disk:\n" + "\n".join(errors), result, dev)


def _scsi_status(dev: RunningDevice) -> dict[str, int]:
    scsi = dev.status()["scsi"]
    assert isinstance(scsi, dict)
    return {k: v for k, v in scsi.items() if isinstance(v, int)}


def _read_gpt(image: bytes, bs: int) -> list[tuple[str, int, int, str]]:
    """(name, first LBA, blocks, type GUID) of each used GPT entry; checks both headers' CRCs."""
    entries_seen = []
    for header_lba in (1, len(image) // bs - 1):
        hdr = image[header_lba * bs:header_lba * bs + 92]
        assert hdr[:8] == b"EFI PART", f"no GPT header signature at LBA {header_lba}: {hdr[:8]!r}"
        size, crc = struct.unpack_from("<II", hdr, 12)
        zeroed = hdr[:16] + b"\0\0\0\0" + hdr[20:size]
        assert zlib.crc32(zeroed) == crc, f"GPT header CRC mismatch at LBA {header_lba}"
        my_lba, alt_lba = struct.unpack_from("<QQ", hdr, 24)
        assert my_lba == header_lba, f"GPT header at LBA {header_lba} says it is at {my_lba}"
        other = len(image) // bs - 1 if header_lba == 1 else 1
        assert alt_lba == other, f"GPT header at LBA {header_lba} names its copy at {alt_lba}, not {other}"
        entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", hdr, 72)
        table = image[entries_lba * bs:entries_lba * bs + count * entry_size]
        assert zlib.crc32(table) == entries_crc, f"GPT entry array CRC mismatch (header at LBA {header_lba})"
        parts = []
        for i in range(count):
            entry = table[i * entry_size:(i + 1) * entry_size]
            if entry[:16] == bytes(16):
                continue
            d1, d2, d3 = struct.unpack_from("<IHH", entry, 0)
            guid = f"{d1:08X}-{d2:04X}-{d3:04X}-{entry[8:10].hex().upper()}-{entry[10:16].hex().upper()}"
            first, last = struct.unpack_from("<QQ", entry, 32)
            name = entry[56:128].decode("utf-16-le").rstrip("\0")
            parts.append((name, first, last - first + 1, guid))
        entries_seen.append(parts)
    assert entries_seen[0] == entries_seen[1], "primary and backup GPT entries differ"
    return entries_seen[0]


def _fat16_read_file(part: bytes, name83: bytes) -> bytes:
    """Read a file from the root directory of a FAT16 volume."""
    bps, spc, reserved, nfats, root_entries = struct.unpack_from("<HBHBH", part, 11)
    sectors_per_fat, = struct.unpack_from("<H", part, 22)
    assert part[510:512] == b"\x55\xaa", "FAT boot sector signature missing"
    assert part[54:62].rstrip() == b"FAT16", f"not FAT16: {part[54:62]!r}"
    fat_off = reserved * bps
    root_off = fat_off + nfats * sectors_per_fat * bps
    data_off = root_off + root_entries * 32
    for i in range(root_entries):
        ent = part[root_off + 32 * i:root_off + 32 * (i + 1)]
        if ent[:11] == name83 and not ent[11] & 0x18:
            cluster, = struct.unpack_from("<H", ent, 26)
            size, = struct.unpack_from("<I", ent, 28)
            out = bytearray()
            while 2 <= cluster < 0xFFF8:
                start = data_off + (cluster - 2) * spc * bps
                out += part[start:start + spc * bps]
                cluster, = struct.unpack_from("<H", part, fat_off + 2 * cluster)
            return bytes(out[:size])
    raise AssertionError(f"{name83!r} not in the FAT root directory")


@pytest.mark.parametrize("bs", [512, 4096], ids=["512-byte-blocks", "4096-byte-blocks"])
def test_linux_uses_the_disk_and_the_image_holds_what_it_wrote(
        bs: int, guest_image: GuestImage, start_device: Callable[..., RunningDevice], tmp_path: Path) -> None:
    rnd = os.urandom
    pattern, small, known = rnd(RAW_SIZE), rnd(SMALL_BLOCKS * bs), rnd(KNOWN_SIZE)
    dev = start_device(DISK_SIZE, extra_args=["--block-size", str(bs)])
    result = run_guest(_guest_script(dev.busid, bs), usbip_port=dev.port, timeout=150, image=guest_image,
                       extra_files={"/pattern.bin": pattern, "/small.bin": small, "/known.bin": known})
    m = result.markers
    assert "failed" not in m, _fail(f"guest step failed: {m.get('failed')} (at step {m.get('step')})", result, dev)
    assert result.rc == 0 and m.get("done") == "1", _fail("guest script did not finish", result, dev)
    assert m.get("blocks") == str(DISK_SIZE // bs) and m.get("block_len") == str(bs), _fail(
        f"READ CAPACITY(16) reported {m.get('blocks')} x {m.get('block_len')} bytes", result, dev)
    assert int(m.get("files_verified", "0")) == 2 * 42, _fail("not every file was verified", result, dev)
    _kernel_clean(result, dev)
    scsi = _scsi_status(dev)
    assert scsi["unmap_commands"] >= 1, f"blkdiscard never reached the device as UNMAP: {scsi}"
    assert scsi["flushes"] >= 1, f"sg_sync never reached the device as SYNCHRONIZE CACHE: {scsi}"
    assert dev.stop() == 0, f"device did not exit cleanly on SIGTERM:\n{dev.log()}"

    image = dev.image.read_bytes()
    assert len(image) == DISK_SIZE, f"image size changed to {len(image)}"
    assert hashlib.md5(image).hexdigest() == m.get("disk_md5"), _fail(
        "the image file differs from what the guest read from the disk", result, dev)
    assert image[RAW_OFFSET:RAW_OFFSET + RAW_SIZE] == pattern, "raw O_DIRECT pattern not in the image"
    lba = small_lba(bs)
    assert image[lba * bs:(lba + SMALL_BLOCKS) * bs] == small, \
        f"{SMALL_BLOCKS}-block write at odd LBA {lba} not in the image"

    parts = _read_gpt(image, bs)
    assert parts == partitions(bs), f"GPT partitions in the image: {parts}"

    _, ext4_off, ext4_len, _ = LAYOUT[0]
    ext4_img = tmp_path / "ext4.img"
    ext4_img.write_bytes(image[ext4_off:ext4_off + ext4_len])
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(ext4_img)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, f"host e2fsck -fn on the ext4 partition: rc={fsck.returncode}\n{fsck.stdout}"
    cat = subprocess.run(["debugfs", "-R", "cat /KNOWN.BIN", str(ext4_img)], capture_output=True, check=False)
    assert cat.stdout == known, f"KNOWN.BIN read by host debugfs differs ({len(cat.stdout)} bytes)"

    _, fat_off, fat_len, _ = LAYOUT[1]
    assert _fat16_read_file(image[fat_off:fat_off + fat_len], b"KNOWN   BIN") == known, \
        "KNOWN.BIN on the FAT partition differs"

    _, scratch_off, scratch_len, _ = LAYOUT[2]
    assert image[scratch_off:scratch_off + scratch_len] == bytes(scratch_len), \
        "the discarded partition does not read as zeros in the image"


FIO_COMMON = "--eta=never --direct=1 --ioengine=psync --verify=crc32c --verify_fatal=1 --filename=/dev/$d"
FIO_JOBS = (
    ("randwrite4k", f"--rw=randwrite --bs=4k --offset=0 --size={8 * MIB}"),
    ("seqwrite64k", f"--rw=write --bs=64k --offset={16 * MIB} --size={16 * MIB}"),
)


def _fio_script(busid: str) -> str:
    runs = "\n".join(
        f"fio --name={name} {args} {FIO_COMMON} || die fio_{name}\n" for name, args in FIO_JOBS)
    verify_only = "\n".join(
        f"fio --name={name} {args} {FIO_COMMON} --verify_only || die fio_verify_only_{name}\n"
        for name, args in FIO_JOBS)
    return f"""
set -u
usbip attach -r 10.0.2.100 -b {busid} || die attach
d=$(wait_disk 20) || die no-disk-after-attach
{runs}
mark written=1
usbip detach -p 0 || die detach
n=0; while [ -e /sys/block/$d ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
sleep 0.5
usbip attach -r 10.0.2.100 -b {busid} || die reattach
d=$(wait_disk 20) || die no-disk-after-reattach
{verify_only}
usbip detach -p 0 || die detach2
check_kernel_log
mark done=1
"""


def _check_fio_blocks(image: bytes, offset: int, size: int, bs: int) -> None:
    """Each block holds a fio verify header naming its own offset and a matching CRC32C."""
    import google_crc32c

    for off in range(offset, offset + size, bs):
        block = image[off:off + bs]
        magic, _vtype, length = struct.unpack_from("<HHI", block, 0)
        hdr_offset, = struct.unpack_from("<Q", block, 16)
        assert magic == 0xACCA and length == bs, f"no fio verify header at byte {off} (magic {magic:#x})"
        assert hdr_offset == off, f"block written for offset {hdr_offset} landed at {off}"
        # fio stores CRC32C without the final inversion: of the header's first 36 bytes, and of the data
        hdr_crc, data_crc = struct.unpack_from("<II", block, 36)
        assert google_crc32c.value(block[:36]) ^ 0xFFFFFFFF == hdr_crc, f"fio header CRC mismatch at byte {off}"
        assert google_crc32c.value(block[44:]) ^ 0xFFFFFFFF == data_crc, f"fio data CRC mismatch at byte {off}"


def test_fio_verify_survives_reattach(guest_image: GuestImage,
                                      start_device: Callable[..., RunningDevice]) -> None:
    dev = start_device(DISK_SIZE)
    result = run_guest(_fio_script(dev.busid), usbip_port=dev.port, timeout=170, image=guest_image)
    m = result.markers
    assert "failed" not in m, _fail(f"guest step failed: {m.get('failed')}", result, dev)
    assert result.rc == 0 and m.get("done") == "1", _fail("guest fio script did not finish", result, dev)
    assert result.output.count("err= 0") >= 2 * len(FIO_JOBS), _fail("fio reported errors", result, dev)
    _kernel_clean(result, dev)
    assert dev.stop() == 0, f"device did not exit cleanly on SIGTERM:\n{dev.log()}"
    image = dev.image.read_bytes()
    _check_fio_blocks(image, 0, 8 * MIB, 4096)
    _check_fio_blocks(image, 16 * MIB, 16 * MIB, 65536)


WRITE_CACHE_SCRIPT = """
set -u
usbip attach -r 10.0.2.100 -b 1-1 || die attach
d=$(wait_disk 20) || die no-disk-after-attach
sd=$(ls -d /sys/block/$d/device/scsi_disk/*)
mark cache_type=$(cat $sd/cache_type | tr ' ' _) fua=$(cat $sd/FUA)
mkfs.ext4 -q -F -L wcache /dev/$d || die mkfs
mkdir -p /mnt/w && mount -t ext4 /dev/$d /mnt/w || die mount
cp /known.bin /mnt/w/KNOWN.BIN || die copy
i=0
while [ $i -lt 20 ]; do
    dd if=/dev/urandom of=/mnt/w/f$i bs=4096 count=$((i + 1)) conv=fsync status=none || die write_$i
    i=$((i + 1))
done
(cd /mnt/w && md5sum KNOWN.BIN f*) | sed 's/^/SUM /'
umount /mnt/w || die umount
check_kernel_log
mark done=1
"""


def test_flushes_reach_the_device_and_survive_its_crash(
        guest_image: GuestImage, start_device: Callable[..., RunningDevice], tmp_path: Path) -> None:
    """With the write cache on, Linux sends SYNCHRONIZE CACHE (and FUA writes) for fsync and unmount;
    what it flushed is in the image after the device process is killed (SIGKILL) and restarted."""
    known = os.urandom(KNOWN_SIZE)
    dev = start_device(DISK_SIZE, extra_args=["--write-cache", "on"])
    result = run_guest(WRITE_CACHE_SCRIPT, usbip_port=dev.port, timeout=150, image=guest_image,
                       extra_files={"/known.bin": known})
    m = result.markers
    assert "failed" not in m, _fail(f"guest step failed: {m.get('failed')}", result, dev)
    assert result.rc == 0 and m.get("done") == "1", _fail("guest script did not finish", result, dev)
    assert m.get("cache_type") == "write_back", _fail(f"kernel sees cache type {m.get('cache_type')}", result, dev)
    _kernel_clean(result, dev)
    scsi = _scsi_status(dev)
    assert scsi["flushes"] >= 20, f"fsync/umount did not reach the device as SYNCHRONIZE CACHE: {scsi}"
    dev.kill()
    again = start_device(DISK_SIZE, image=dev.image, state=dev.state, extra_args=["--write-cache", "on"])
    assert again.stop() == 0, f"restarted device did not exit cleanly:\n{again.log()}"
    fs_img = dev.image
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(fs_img)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, f"host e2fsck -fn after device crash + restart: rc={fsck.returncode}\n{fsck.stdout}"
    sums = {line.split()[2]: line.split()[1] for line in result.output.splitlines() if line.startswith("SUM ")}
    assert len(sums) == 21 and hashlib.md5(known).hexdigest() == sums["KNOWN.BIN"], _fail(
        f"guest checksums: {sums}", result, dev)
    for name, md5 in sums.items():
        cat = subprocess.run(["debugfs", "-R", f"cat /{name}", str(fs_img)], capture_output=True, check=False)
        assert hashlib.md5(cat.stdout).hexdigest() == md5, \
            f"{name} (fsynced before the device was killed) differs after restart ({len(cat.stdout)} bytes)"
