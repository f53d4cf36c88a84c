"""Switchover and failback end to end, with Debian's kernel as the protected server and as the standby host.

A local unit (USB/IP, flash journal) replicates to a remote unit over TLS. Then:
1. phase one: the guest attaches the local unit's disk, makes ext4 on it, writes files and their sha256
   list, unmounts and detaches; the remote applies it all;
2. the local unit dies (SIGKILL); `usbmirror promote --usbip` makes the remote's copy primary;
3. phase two: a second guest, the standby host, attaches the promoted copy, checks the phase-one files
   and `e2fsck`, and writes phase two;
4. the local unit restarts, reaches the remote and becomes its replica: a SCSI client's WRITE gets
   DATA PROTECT / WRITE PROTECTED and MODE SENSE shows the disk write-protected, reads go on;
5. `usbmirror failback`: the local unit is primary again and its volume equals the remote's copy byte
   for byte; it read only the regions the standby host wrote (`last_resync` mode `bitmap`) and moved
   no more than the pieces those writes touched;
6. phase three: a third guest attaches the local unit again, checks phases one and two, writes phase
   three; the remote applies it and ends equal to the local volume.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from host_tests.realkernel.conftest import run_checked_guest
from host_tests.units import Units, drained, first_difference, free_port, streaming, usbmirror
from host_tests.usbip_support import UsbipClient
from hw.qemu.build_guest import GuestImage
from hw.qemu.guest import GuestResult

pytestmark = [pytest.mark.realkernel, pytest.mark.slow]

DISK_MIB = 32
WRITE_PROTECTED = (0x7, 0x27, 0x00)

ATTACH = """
set -u
usbip_attach 1-1 || die attach
d=$(wait_disk 30) || die no_disk
mark disk=$d
"""

DETACH = """
umount /mnt/m || die umount
e2fsck -f -n /dev/$d >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; die e2fsck; }
check_kernel_log
usbip detach -p 0 >/dev/null 2>&1 || die detach
n=0; while [ -e /sys/block/$d ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -e /sys/block/$d ] && die disk_still_present
mark done=1
"""


def write_phase(n: int) -> str:
    """Guest lines: write phase `n`'s files under /mnt/m/pN and their sha256 list /mnt/m/SUMS$N."""
    return f"""
step write_phase{n}
mkdir -p /mnt/m/p{n}
i=0
while [ $i -lt 8 ]; do
    dd if=/dev/urandom of=/mnt/m/p{n}/f$i bs=1024 count=$((i * 41 + {n})) 2>/dev/null || die write{n}
    i=$((i + 1))
done
dd if=/dev/urandom of=/mnt/m/p{n}/big bs=1048576 count=1 2>/dev/null || die write_big{n}
(cd /mnt/m/p{n} && sha256sum * > /mnt/m/SUMS{n}) || die hash{n}
sync
mark sums{n}=$(sha256sum < /mnt/m/SUMS{n} | cut -d' ' -f1)
"""


def check_phase(n: int) -> str:
    """Guest lines: every file of phase `n` has the content its sha256 list says (after dropping caches)."""
    return f"""
step check_phase{n}
echo 3 > /proc/sys/vm/drop_caches
[ -f /mnt/m/SUMS{n} ] || die phase{n}_missing
(cd /mnt/m/p{n} && sha256sum -c -s /mnt/m/SUMS{n}) || die phase{n}_files_differ
mark checked{n}=$(sha256sum < /mnt/m/SUMS{n} | cut -d' ' -f1)
"""


MOUNT = """
e2fsck -f -n /dev/$d >/tmp/fsck0.out 2>&1 || { cat /tmp/fsck0.out; die e2fsck_before; }
mkdir -p /mnt/m && mount -t ext4 /dev/$d /mnt/m || die mount
"""

PHASE_ONE = ATTACH + """
step mkfs
mkfs.ext4 -q -F -L failover /dev/$d || die mkfs
mkdir -p /mnt/m && mount -t ext4 /dev/$d /mnt/m || die mount
""" + write_phase(1) + DETACH
PHASE_TWO = ATTACH + MOUNT + check_phase(1) + write_phase(2) + DETACH
PHASE_THREE = ATTACH + MOUNT + check_phase(1) + check_phase(2) + write_phase(3) + DETACH


def guest(script: str, port: int, image: GuestImage, units: Units, what: str) -> GuestResult:
    res = run_checked_guest(script, port, image, units, what, timeout=240)
    assert res.markers["kernel_errors"] == "0", f"{what}: the kernel logged disk errors\n{res.describe()}"
    return res


def test_switchover_standby_host_and_failback_with_a_real_kernel(units: Units, tmp_path: Path,
                                                                 guest_image: GuestImage) -> None:
    tls = units.pair("dr1", ["server1"])
    volume, target = tmp_path / "local-volume.img", tmp_path / "remote-target.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=volume, size=f"{DISK_MIB}M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address])
    local.wait_status(streaming(), what="the link to the remote")

    one = guest(PHASE_ONE, local.port, guest_image, units, "phase one through the local unit")
    local.wait_status(drained, timeout=120, what="the remote to apply phase one")
    local.kill9()
    remote.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")

    standby_port = free_port()
    pr = usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                   f"127.0.0.1:{standby_port}")
    assert pr.returncode == 0, pr.stderr + units.describe()
    assert f"served read-write over USB/IP on 127.0.0.1:{standby_port}" in pr.stdout

    two = guest(PHASE_TWO, standby_port, guest_image, units, "phase two on the standby host")
    assert two.markers["checked1"] == one.markers["sums1"]
    (src,) = remote.status()["sources"]
    assert src["primary"] is True and src["promoted_io"]["bytes_written"] > 0
    promoted_io = src["promoted_io"]

    again = units.start_local(volume=volume, size=f"{DISK_MIB}M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address], state_dir=local.state_dir, port=local.port)
    st = again.wait_status(lambda s: s["host_writes"] == "refused", what="the old primary to become a replica")
    assert st["primary"] is False and st["split_brain"] is False
    assert st["failover_loss"]["writes"] == 0  # everything it acknowledged had reached the remote
    before = volume.read_bytes()
    with UsbipClient("127.0.0.1", again.port) as c:
        assert c.import_device("1-1").device is not None
        c.enumerate()
        c.until_ready()
        assert c.write10(2048, b"\xee" * 4096) == 1
        assert c.request_sense() == WRITE_PROTECTED
        mode = c.scsi(bytes([0x1A, 0, 0x3F, 0, 192, 0]), data_in=192)  # MODE SENSE(6), all pages
        assert mode.csw_status == 0 and mode.data[2] & 0x80, "MODE SENSE does not show the disk write-protected"
        assert c.read10(0, 8) == before[:4096]
    assert volume.read_bytes() == before, "the replica's volume changed under a refused write"

    fb = usbmirror("failback", "--state-dir", str(remote.state_dir), "--source", "server1", "--timeout", "120",
                   timeout=180)
    assert fb.returncode == 0, fb.stderr + units.describe()
    st = again.wait_status(lambda s: s["host_writes"] == "accepted", what="the local unit to serve writes again")
    assert st["primary"] is True and st["data_generation"].startswith("3:")
    diff = first_difference(volume, target)
    assert diff is None, f"after the failback the local volume differs from the remote's copy at byte {diff}"
    rs = st["last_resync"]
    moved = rs["bytes_moved"]
    assert 0 < moved < DISK_MIB << 20, f"the failback moved {moved} bytes of a {DISK_MIB} MiB disk"
    # only the union of both sides' writes was read: the standby's regions (the local unit lost nothing),
    # and of them only the 4 KiB pieces that differ moved (a write spills into at most two more pieces)
    assert rs["mode"] == "bitmap" and "mode_reason" not in rs, rs
    assert rs["bytes_compared"] <= promoted_io["dirty_regions"] << 20, (rs, promoted_io)
    assert moved <= promoted_io["bytes_written"] + 2 * 4096 * promoted_io["writes"], (rs, promoted_io)
    (src,) = remote.status()["sources"]
    assert src["primary"] is False and src["data_generation"] == st["data_generation"]

    again.wait_status(streaming(), what="replication to resume")
    three = guest(PHASE_THREE, again.port, guest_image, units, "phase three through the local unit")
    assert three.markers["checked1"] == one.markers["sums1"] and three.markers["checked2"] == two.markers["sums2"]
    again.wait_status(drained, timeout=120, what="the remote to apply phase three")
    assert again.stop() == 0 and remote.stop() == 0, units.describe()
    diff = first_difference(volume, target)
    assert diff is None, f"phase three did not reach the remote: first difference at byte {diff}"
