"""Linux's own iSCSI initiator (open-iscsi: iscsid, iscsiadm and the kernel's iscsi_tcp) in Debian's
kernel, against `usbmirror local --iscsi --iscsi-chap`, with a kill -9 and restart of the unit in the middle.

The unit requires CHAP: the initiator's discovery without credentials and then with a wrong secret is
refused, and with the right one (open-iscsi's discovery and session CHAP settings) it goes on.

The guest discovers the target (SendTargets), logs in, writes a GPT and an ext4 file system, writes a
4 MiB seed file and syncs; then it writes a tag block in free space past the partition and runs fio
(64 KiB direct writes with crc32c verify information, then the verify pass) on a file in the file
system. A host thread sees the tag block reach the volume and the journal move on by 40 more records,
SIGKILLs the unit and starts it again on the same volume, journal, state dir and port. The initiator
notices the dead connection, logs in again (the replacement timeout is 120 s) and re-sends what was not
answered. Afterwards: fio's verify passed, `e2fsck -fn` is clean, the seed file is unchanged, the
kernel logged no I/O error and no file-system error, and the session was recovered at least once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from host_tests.realkernel.conftest import LINUX_FS, write_gpt
from host_tests.units import KillAndRestart, Status, Units, free_port
from hw.qemu.build_guest import GuestImage
from hw.qemu.iscsi_layer import run_iscsi_guest

pytestmark = pytest.mark.realkernel

MIB = 1 << 20
DISK_MIB = 128
TAG_OFFSET = 127 * MIB  # free space after the partition, before the backup GPT
TAG = b"USBMIRROR-ISCSI-FIO-STARTS"
RECORDS_AFTER_TAG = 40
CHAP_USER, CHAP_SECRET = "server1", "mirror-chap-secret-1"  # the unit requires CHAP (--iscsi-chap)

GUEST_SCRIPT = f"""
set -u
step start
iscsi_start
step chap_refused
# the unit requires CHAP: discovery without credentials, then with a wrong secret, is refused
/sbin/iscsiadm -m discovery -t sendtargets -p 10.0.2.100:3240 > /tmp/d0 2>&1; rc=$?
cat /tmp/d0
[ $rc -ne 0 ] || die discovery_without_chap_accepted
mark no_chap_rc=$rc
grep -v '[.]auth[.]' /etc/iscsi/iscsid.conf > /tmp/iscsid.conf
chap_conf() {{
    cat /tmp/iscsid.conf
    for k in discovery.sendtargets.auth node.session.auth; do
        printf '%s.authmethod = CHAP\\n%s.username = {CHAP_USER}\\n%s.password = %s\\n' $k $k $k "$1"
    done
}}
chap_conf wrong-secret-0000 > /etc/iscsi/iscsid.conf
/sbin/iscsiadm -m discovery -t sendtargets -p 10.0.2.100:3240 > /tmp/d1 2>&1; rc=$?
cat /tmp/d1
[ $rc -ne 0 ] || die discovery_with_wrong_secret_accepted
mark wrong_secret_rc=$rc
chap_conf {CHAP_SECRET} > /etc/iscsi/iscsid.conf
step login
iscsi_login 10.0.2.100:3240
d=$(wait_disk 30) || die no_disk
mark disk=$d size=$(cat /sys/block/$d/size)
step partition
{write_gpt([("data", 2048, 120 * MIB // 512, LINUX_FS)])}
step mkfs
mkfs.ext4 -q /dev/${{d}}1 || die mkfs
mount /dev/${{d}}1 /mnt || die mount
dd if=/dev/urandom of=/mnt/seed bs=1M count=4 2>/dev/null || die seed
sync
seed=$(md5sum /mnt/seed | cut -d' ' -f1)
mark seed=$seed
step fio_across_restart
printf '{TAG.decode()}' > /tmp/tag
dd if=/tmp/tag of=/dev/$d bs=4096 seek={TAG_OFFSET // 4096} count=1 conv=sync,fsync 2>/dev/null || die tag
fio --name=across --filename=/mnt/fio.dat --size=24M --bs=64k --rw=write --direct=1 --ioengine=psync \\
    --verify=crc32c --do_verify=1 --minimal > /tmp/fio.out 2>&1 || {{ cat /tmp/fio.out; die fio; }}
mark fio=ok
step check
sync
umount /mnt || die umount
e2fsck -fn /dev/${{d}}1 > /tmp/fsck.out 2>&1 || {{ cat /tmp/fsck.out; die fsck; }}
mount /dev/${{d}}1 /mnt || die remount
[ "$(md5sum /mnt/seed | cut -d' ' -f1)" = "$seed" ] || die seed_changed
umount /mnt
mark io_errors=$(dmesg | grep -ciE 'i/o error|ext4-fs error|rejecting i/o')
mark recoveries=$(dmesg | grep -ciE 'detected conn error|session recovery timed out|connection[0-9:]* .*error')
dmesg | grep -iE 'iscsi|connection[0-9]|session' | tail -20
/sbin/iscsiadm -m node --logout > /dev/null || die logout
mark done=1
"""


def tag_then_records(volume: Path, more: int) -> Callable[[Status], bool]:
    """Status predicate: the guest's tag block is on the volume and the journal has gone `more`
    records past the head seen then (fio is writing)."""
    seen: list[int] = []

    def pred(st: Status) -> bool:
        head = int(st["journal"]["head_seq"])
        if not seen:
            with open(volume, "rb") as f:
                f.seek(TAG_OFFSET)
                if f.read(len(TAG)) != TAG:
                    return False
            seen.append(head)
        return head >= seen[0] + more

    return pred


def test_open_iscsi_survives_a_unit_restart_and_loses_nothing(tmp_path: Path, guest_image: GuestImage) -> None:
    port = free_port()
    with Units(tmp_path) as units:
        state = tmp_path / "state"
        volume = tmp_path / "volume.img"
        argv = ["local", "--volume", str(volume), "--size", f"{DISK_MIB}M", "--iscsi", f"127.0.0.1:{port}",
                "--state-dir", str(state), "--journal", str(tmp_path / "journal"), "--journal-size", "64M",
                "--iscsi-chap", f"{CHAP_USER}:{CHAP_SECRET}"]
        unit = units.start_argv("local", argv, state, port)
        killer = KillAndRestart(unit, unit, tag_then_records(volume, RECORDS_AFTER_TAG),
                                what="the guest's tag block and fio's writes", timeout=300)
        killer.start()
        res = run_iscsi_guest(GUEST_SCRIPT, target_port=port, timeout=500, image=guest_image)
        killer.join(130)
        assert killer.error is None, f"{killer.error}\n{units.describe()}"
        assert killer.before is not None and killer.after is not None, "the unit was never restarted"
        assert res.rc == 0, res.describe() + "\n" + units.describe()
        m = res.markers
        assert m.get("fio") == "ok" and m.get("done") == "1", res.describe()
        assert m["io_errors"] == "0", res.describe()
        assert int(m["recoveries"]) >= 1, "the initiator never saw the restart:\n" + res.describe()
        # open-iscsi without credentials and with a wrong secret was refused (exit 24: login failed
        # for authorization), and the unit counted both before the restart
        assert m["no_chap_rc"] != "0" and m["wrong_secret_rc"] != "0", res.describe()
        isc = killer.before["iscsi"]
        assert isc["chap"] is True and isc["logins_refused"] >= 2, isc
        print(f"iSCSI guest: {res.wall:.0f} s, unit restarted at journal head {killer.before['journal']['head_seq']}, "
              f"session recoveries seen by the kernel: {m['recoveries']}")
