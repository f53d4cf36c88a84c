"""End to end: Debian's kernel writes through a real local unit; the remote unit ends up with the same disk.

A local unit (USB/IP, flash journal, one remote over TLS made with `usbmirror pair`) and a remote
unit run as processes. In the QEMU guest the kernel attaches the disk and
1. runs fio random + sequential writes with crc32c verification (O_DIRECT) on a raw region;
2. partitions it (GPT), makes ext4, writes files, checks their sha256 after dropping caches,
   unmounts and runs `e2fsck -f`;
3. hashes the whole disk as it reads it, then detaches.
The host then waits until the remote has acknowledged every durable journal record, runs
`usbmirror verify`, stops both units and compares the remote target with the local volume byte for
byte, and with the guest's own hash of the disk. Run with an `async` remote, a `sync` remote, and an
`async` remote that is killed with SIGKILL mid-workload and restarted on the same port.

A second test keeps the remote away for the whole workload, so an 8 MiB journal overflows into the
dirty-region bitmap; the remote comes back, the server uses the disk again (a second boot writes one
more file), and the resync of the dirty regions must make the remote identical.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from host_tests.units import KillAndRestart, Units, drained, first_difference, streaming, usbmirror
from hw.qemu.build_guest import GuestImage
from hw.qemu.guest import GuestResult, run_guest

pytestmark = [pytest.mark.realkernel, pytest.mark.slow]

MIB = 1 << 20
DISK_MIB = 96
PART_MIB = 60                  # GPT partition 1: 1 MiB .. 61 MiB
RAW_OFFSET_MIB = 68            # fio region, outside the partition and the backup GPT
RAW_RAND_MIB = 4
RAW_SEQ_MIB = 8
KILL_REMOTE_AT = 600           # journal records before the remote unit is killed (variant remote-kill)

GUEST_SCRIPT = f"""
set -u
step attach
usbip_attach 1-1 || die attach
d=$(wait_disk 30) || die no_disk
mark disk=$d

step fio_raw
fio --name=rand --filename=/dev/$d --offset={RAW_OFFSET_MIB}M --size={RAW_RAND_MIB}M --bs=4k --rw=randwrite \\
    --direct=1 --ioengine=psync --verify=crc32c --do_verify=1 --verify_fatal=1 --minimal >/tmp/fio1.out 2>&1 \\
    || {{ cat /tmp/fio1.out; die fio_random_verify; }}
mark fio_rand_write_iops=$(cut -d';' -f49 /tmp/fio1.out)
fio --name=seq --filename=/dev/$d --offset={RAW_OFFSET_MIB + RAW_RAND_MIB}M --size={RAW_SEQ_MIB}M --bs=64k \\
    --rw=write --direct=1 --ioengine=psync --verify=crc32c --do_verify=1 --verify_fatal=1 --minimal \\
    >/tmp/fio2.out 2>&1 || {{ cat /tmp/fio2.out; die fio_seq_verify; }}
mark fio_seq_write_kib_s=$(cut -d';' -f48 /tmp/fio2.out)
raw=$(dd if=/dev/$d bs=1048576 skip={RAW_OFFSET_MIB} count={RAW_RAND_MIB + RAW_SEQ_MIB} iflag=direct 2>/dev/null \\
      | sha256sum | cut -d' ' -f1)
mark raw_sha256=$raw

step gpt
printf 'label: gpt\\nstart=2048, size={PART_MIB * MIB // 512}, type=L, name=mirrored\\n' | sfdisk -q /dev/$d \\
    || die sfdisk
n=0; while [ ! -b /dev/${{d}}1 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
[ -b /dev/${{d}}1 ] || mdev -s
[ -b /dev/${{d}}1 ] || die partition_not_seen

step ext4
mkfs.ext4 -q -F -L mirrored /dev/${{d}}1 || die mkfs
mkdir -p /mnt/m && mount -t ext4 /dev/${{d}}1 /mnt/m || die mount
mkdir -p /mnt/m/tree/sub
i=0
while [ $i -lt 30 ]; do
    dd if=/dev/urandom of=/mnt/m/tree/f$i bs=1024 count=$((i * 37 + 1)) 2>/dev/null || die write_small
    i=$((i + 1))
done
dd if=/dev/urandom of=/mnt/m/tree/sub/big bs=1048576 count=12 2>/dev/null || die write_big
cp -a /lib/modules /mnt/m/modules 2>/dev/null || die copy_tree
(cd /mnt/m && find . -type f | sort | xargs sha256sum) > /tmp/sums || die hash
sync
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt/m && sha256sum -c -s /tmp/sums) || die sha256_after_drop_caches
mark files=$(wc -l < /tmp/sums)
umount /mnt/m || die umount
e2fsck -f -n /dev/${{d}}1 >/tmp/fsck.out 2>&1 || {{ cat /tmp/fsck.out; die e2fsck; }}
mark fsck=clean

step checksum
mark disk_sha256=$(dd if=/dev/$d bs=1048576 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)

step detach
usbip detach -p 0 >/dev/null 2>&1 || die detach
n=0; while [ -e /sys/block/$d ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -e /sys/block/$d ] && die disk_still_present
mark done=1
"""


def sha256_range(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, MIB))
            assert chunk, f"{path} ends before {offset + length}"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def fail(what: str, res: GuestResult, units: Units) -> str:
    return f"{what}\n{res.describe()}\n{units.describe()}"


@pytest.mark.parametrize("variant", ["async", "sync", "async+remote-kill"])
def test_guest_workload_is_mirrored_byte_for_byte(variant: str, units: Units, tmp_path: Path,
                                                  guest_image: GuestImage) -> None:
    mode = variant.split("+")[0]
    killer: KillAndRestart | None = None
    tls = units.pair("dr1", ["server1"])
    volume, target = tmp_path / "local-volume.img", tmp_path / "remote-target.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    spec = remote.address if mode == "async" else f"{remote.address},mode=sync"
    local = units.start_local(volume=volume, size=f"{DISK_MIB}M", journal_size="128M",
                              source_id="server1", tls_dir=tls, remotes=[spec])
    local.wait_status(streaming(), what="the link to the remote")
    if variant.endswith("remote-kill"):
        # the remote unit crashes in the middle of the workload and comes back on the same port
        killer = KillAndRestart(local, remote, lambda st: st["journal"]["head_seq"] >= KILL_REMOTE_AT,
                                what=f"journal head_seq >= {KILL_REMOTE_AT}")
        killer.start()
    res = run_guest(GUEST_SCRIPT, usbip_port=local.port, timeout=400, image=guest_image)
    if killer is not None:
        killer.join(130)
        assert killer.after is not None and killer.error is None, f"remote restart: {killer.error}\n{units.describe()}"
    assert res.rc == 0 and res.markers.get("done") == "1", fail("guest workload failed", res, units)
    assert res.markers.get("fsck") == "clean"
    print(f"guest markers ({variant}): {res.markers} wall={res.wall:.1f}s")
    assert int(res.markers["files"]) > 30

    st = local.status()
    if mode == "sync":
        # every write the guest saw complete was already durable on the remote: no draining needed
        (r,) = st["remotes"]
        assert r["acked_seq"] >= st["journal"]["durable_seq"], (r, st["journal"])
    durable = st["journal"]["durable_seq"]
    print(f"journal durable_seq after the workload: {durable}")
    assert durable > 1000, f"the workload should be thousands of journal records, got {durable}"
    st = local.wait_status(drained, timeout=180, what="the remote to acknowledge every durable record")
    (r,) = st["remotes"]
    assert (r["mode"], r["state"]) == (mode, "streaming")
    if killer is not None:
        assert r["connects"] >= 2, f"the local unit never reconnected: {r}"
    assert st["journal"]["overflow"] is False

    v = usbmirror("verify", "--state-dir", str(local.state_dir), timeout=300)
    assert v.returncode == 0 and "MATCH" in v.stdout, f"usbmirror verify: {v.stdout}{v.stderr}\n{units.describe()}"
    assert local.stop() == 0, units.describe()
    assert remote.stop() == 0, units.describe()

    assert volume.stat().st_size == target.stat().st_size == DISK_MIB * MIB
    diff = first_difference(volume, target)
    assert diff is None, f"remote target differs from the local volume at byte {diff} (lba {diff // 512})"
    guest_sum = res.markers["disk_sha256"]
    assert sha256_range(target, 0, DISK_MIB * MIB) == guest_sum, "the remote copy is not the disk the guest read"
    raw = (RAW_OFFSET_MIB * MIB, (RAW_RAND_MIB + RAW_SEQ_MIB) * MIB)
    assert sha256_range(target, *raw) == res.markers["raw_sha256"], "fio region on the remote differs"
    with open(target, "rb") as f:
        f.seek(512)
        assert f.read(8) == b"EFI PART", "no GPT header on the remote copy"


GUEST_AFTER_OUTAGE = """
set -u
usbip_attach 1-1 || die attach
d=$(wait_disk 30) || die no_disk
n=0; while [ ! -b /dev/${d}1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -b /dev/${d}1 ] || mdev -s
mkdir -p /mnt/m && mount -t ext4 /dev/${d}1 /mnt/m || die mount
dd if=/dev/urandom of=/mnt/m/after-outage.bin bs=1048576 count=4 2>/dev/null || die write
sync
umount /mnt/m || die umount
e2fsck -f -n /dev/${d}1 >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; die e2fsck; }
mark disk_sha256=$(dd if=/dev/$d bs=1048576 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
usbip detach -p 0 >/dev/null 2>&1 || die detach
mark done=1
"""


def test_journal_overflow_during_an_outage_is_resynced(units: Units, tmp_path: Path,
                                                       guest_image: GuestImage) -> None:
    tls = units.pair("dr1", ["server1"])
    volume, target = tmp_path / "local-volume.img", tmp_path / "remote-target.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=volume, size=f"{DISK_MIB}M", journal_size="8M", source_id="server1",
                              tls_dir=tls, remotes=[remote.address])
    local.wait_status(streaming(), what="the link to the remote")
    assert remote.stop() == 0, units.describe()

    res = run_guest(GUEST_SCRIPT, usbip_port=local.port, timeout=400, image=guest_image)
    assert res.rc == 0 and res.markers.get("done") == "1", fail("guest workload failed", res, units)
    st = local.status()
    assert st["journal"]["overflow"] is True and st["journal"]["dirty_regions"] > 0, st["journal"]
    assert st["remotes"][0]["state"] != "streaming"

    remote.launch()
    local.wait_status(drained, timeout=120, what="the journaled records to reach the returning remote")
    res2 = run_guest(GUEST_AFTER_OUTAGE, usbip_port=local.port, timeout=300, image=guest_image)
    assert res2.rc == 0 and res2.markers.get("done") == "1", fail("second boot failed", res2, units)
    st = local.wait_status(
        lambda st: st["journal"]["overflow"] is False and st["journal"]["dirty_regions"] == 0 and drained(st)
        and not st["remotes"][0]["resync"]["active"],
        timeout=180, what="the overflow to end and the dirty regions to reach the remote")
    print(f"after the outage: journal {st['journal']['overflow_events']} overflow(s), remote {st['remotes'][0]}")
    v = usbmirror("verify", "--state-dir", str(local.state_dir), timeout=300)
    assert v.returncode == 0, f"usbmirror verify after the resync: {v.stdout}{v.stderr}\n{units.describe()}"
    assert local.stop() == 0 and remote.stop() == 0, units.describe()
    diff = first_difference(volume, target)
    assert diff is None, f"remote target differs from the local volume at byte {diff}\n{units.describe()}"
    assert sha256_range(target, 0, DISK_MIB * MIB) == res2.markers["disk_sha256"]
