"""Switchover to a standby VM over iSCSI with Linux's own initiator (open-iscsi: iscsid, iscsiadm and the
kernel's iscsi_tcp, `hw/qemu/iscsi_layer.py`), and the failback that brings its writes home.

A local unit replicates to a remote unit; the host writes 2 MiB of random data through the local unit
(USB/IP). The local unit dies (SIGKILL); `usbmirror promote --iscsi` serves the remote's copy. The
guest, the standby host, discovers the target (SendTargets), logs in, reads the 2 MiB back (its md5
must be the one the host wrote), writes 1 MiB of its own with O_DIRECT and fsync, reads it back, and
logs out. The remote's target holds the guest's megabyte; the local unit restarts as a replica,
`usbmirror failback` hands the source back, and the local volume equals the remote's copy byte for
byte, the guest's megabyte in it. About 30 s.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from host_tests.units import Units, drained, first_difference, free_port, streaming, usbmirror
from host_tests.usbip_support import UsbipClient
from hw.qemu.build_guest import GuestImage
from hw.qemu.iscsi_layer import run_iscsi_guest

pytestmark = pytest.mark.realkernel

MIB = 1 << 20
DISK_MIB = 32
SOURCE_AT, GUEST_AT = 1 * MIB, 8 * MIB

GUEST_SCRIPT = f"""
set -u
step start
iscsi_start
step login
iscsi_login 10.0.2.100:3240
d=$(wait_disk 30) || die no_disk
mark disk=$d size=$(cat /sys/block/$d/size)
step read_the_copy
mark source_md5=$(dd if=/dev/$d bs=65536 skip={SOURCE_AT // 65536} count=32 iflag=direct 2>/dev/null | md5sum | cut -c1-32)
step write
dd if=/dev/urandom of=/tmp/mine bs=65536 count=16 2>/dev/null || die pattern
dd if=/tmp/mine of=/dev/$d bs=65536 seek={GUEST_AT // 65536} oflag=direct conv=fsync,notrunc 2>/dev/null || die write
mark guest_md5=$(md5sum < /tmp/mine | cut -d' ' -f1)
mark back_md5=$(dd if=/dev/$d bs=65536 skip={GUEST_AT // 65536} count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
mark io_errors=$(dmesg | grep -ciE 'i/o error|rejecting i/o')
/sbin/iscsiadm -m node --logout > /dev/null || die logout
mark done=1
"""


def test_a_standby_vm_takes_the_promoted_copy_over_iscsi_and_failback_brings_its_writes_home(
        tmp_path: Path, guest_image: GuestImage) -> None:
    with Units(tmp_path) as units:
        tls = units.pair("dr1", ["server1"])
        volume, target = tmp_path / "local-volume.img", tmp_path / "remote-target.img"
        remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
        local = units.start_local(volume=volume, size=f"{DISK_MIB}M", source_id="server1", tls_dir=tls,
                                  remotes=[remote.address])
        local.wait_status(streaming(), what="the link to the remote")
        written = os.urandom(2 * MIB)
        with UsbipClient("127.0.0.1", local.port) as c:
            assert c.import_device("1-1").device is not None
            c.enumerate()
            c.until_ready()
            for i in range(0, len(written), 64 * 1024):
                assert c.write10((SOURCE_AT + i) // 512, written[i:i + 64 * 1024]) == 0
        local.wait_status(drained, timeout=120, what="the remote to apply the source's writes")
        local.kill9()
        remote.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")

        port = free_port()
        pr = usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--iscsi",
                       f"127.0.0.1:{port}")
        assert pr.returncode == 0, pr.stderr + units.describe()
        assert f"served read-write over iSCSI on 127.0.0.1:{port} target iqn." in pr.stdout

        res = run_iscsi_guest(GUEST_SCRIPT, target_port=port, timeout=240, image=guest_image)
        m = res.markers
        assert res.rc == 0 and m.get("done") == "1", res.describe() + "\n" + units.describe()
        assert m["size"] == str(DISK_MIB * MIB // 512)
        assert m["source_md5"] == hashlib.md5(written).hexdigest(), "the standby VM did not read what the source wrote"
        assert m["back_md5"] == m["guest_md5"] and m["io_errors"] == "0", res.describe()
        with open(target, "rb") as f:
            f.seek(GUEST_AT)
            assert hashlib.md5(f.read(MIB)).hexdigest() == m["guest_md5"], "the guest's write is not in the copy"
        (src,) = remote.status()["sources"]
        assert src["promoted_io"]["bytes_written"] >= MIB and src["served"]["logins"] >= 1

        again = units.start_local(volume=volume, size=f"{DISK_MIB}M", source_id="server1", tls_dir=tls,
                                  remotes=[remote.address], state_dir=local.state_dir, port=local.port)
        again.wait_status(lambda s: s["host_writes"] == "refused", what="the old primary to become a replica")
        fb = usbmirror("failback", "--state-dir", str(remote.state_dir), "--source", "server1", "--timeout", "120",
                       timeout=180)
        assert fb.returncode == 0, fb.stderr + units.describe()
        again.wait_status(lambda s: s["host_writes"] == "accepted", what="the local unit to serve writes again")
        diff = first_difference(volume, target)
        assert diff is None, f"after the failback the local volume differs from the remote's copy at byte {diff}"
        with open(volume, "rb") as f:
            f.seek(GUEST_AT)
            assert hashlib.md5(f.read(MIB)).hexdigest() == m["guest_md5"]
        print(f"standby VM over iSCSI: guest {res.wall:.0f} s")
