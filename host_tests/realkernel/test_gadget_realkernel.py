"""The board's gadget path in a real kernel: configfs + FunctionFS + dummy_hcd, all inside the QEMU guest.

Debian's stock kernel boots with Python; the firmware (`python3 -m firmware.gadget_main`, the same BOT
core and SCSI target as every other transport) composes a libcomposite gadget, serves the mass-storage
function through FunctionFS and binds to `dummy_udc.0`. The guest's own usb-storage/sd drivers attach it
as /dev/sdX, exactly as a server would over a cable. In one boot, at high speed (a Pi-class board's
controller) the guest runs:

- SCSI probes, raw I/O, GPT, ext4, vfat, fsck and discard;
- a SCSI bus reset and a device reset in the middle of a large direct write; an unplug/replug
  (unbind and rebind of the UDC behind the firmware's back);
- the ACM status console, read with pyserial;
- SIGKILL of the firmware and a restart: the stale gadget is cleaned up, the device re-enumerates and
  every acknowledged write is still there;
- the real-board pyusb tests (host_tests/test_pyusb_board.py) against the gadget through libusb;
- a clean stop (SIGTERM) that leaves nothing in configfs;
- SIGTERM while the host has enumerated but never configured the device;
then dummy_hcd is loaded again at super speed, the same disk enumerates with the SuperSpeed descriptors
and its data is checked, and
- the unit's own entry point `usbmirror local --gadget` with its journal, `usbmirror
  status`, the ACM console showing the unit's status, and the install self-test on real configfs;
- ep0 while a WRITE is held by a frozen journal;
then dummy_hcd is loaded a third time with two UDCs for a switchover on the gadget: a local unit on
one replicates over TLS to a remote unit, is killed, `usbmirror promote --gadget` serves the copy on
the other, the old local unit comes back as a write-protected replica that catches up on the
standby host's writes, and `usbmirror failback` hands the source back to it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from host_tests.realkernel.conftest import BASIC_DATA, LINUX_FS, write_gpt
from host_tests.units import usbmirror
from hw.qemu.build_guest import BuildError, GuestImage
from hw.qemu.guest import GuestResult

pytestmark = [pytest.mark.realkernel, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
SECTOR = 512
PARTITIONS = (
    ("ext4part", 2048, 24 * MIB // SECTOR, LINUX_FS),
    ("fatpart", 2048 + 24 * MIB // SECTOR, 16 * MIB // SECTOR, BASIC_DATA),
    ("scratch", 2048 + 40 * MIB // SECTOR, 8 * MIB // SECTOR, LINUX_FS),
)
RAW_OFFSET = 52 * MIB
SERIAL = "0123456789ABCDEF0123"


def _script() -> str:
    return f"""
set -u
load_gadget_stack
start_fw() {{
    (cd /opt/usbmirror && exec python3 -m firmware.gadget_main --volume /tmp/disk.img --size 64M \\
        --udc dummy_udc.0 --acm --serial {SERIAL}) >> /tmp/fw.log 2>&1 &
    FW=$!
}}

step enumerate
start_fw
d=$(wait_disk 40) || fwdie no_disk
mark disk=$d speed=$(cat /sys/class/udc/dummy_udc.0/current_speed)
sg=$(ls /sys/block/$d/device/scsi_generic/)
sd=$(ls -d /sys/block/$d/device/scsi_disk/*)

step scsi_probes
sg_inq /dev/$d || fwdie sg_inq
sg_vpd -p 0x80 /dev/$d | tee /tmp/vpd80 || fwdie sg_vpd_80
grep -q {SERIAL} /tmp/vpd80 && mark serial_ok=1
sg_vpd -p 0x83 /dev/$d || fwdie sg_vpd_83
sg_readcap -l /dev/$d > /tmp/cap || fwdie sg_readcap
mark blocks=$(sed -n 's/.*Number of logical blocks=\\([0-9]*\\).*/\\1/p' /tmp/cap)
sg_modes -a /dev/$d > /dev/null || fwdie sg_modes
sg_turs -v /dev/$d || fwdie sg_turs
sg_sync -v /dev/$d || fwdie sg_sync

step raw
dd if=/dev/urandom of=/tmp/pattern bs=65536 count=64 2>/dev/null
dd if=/tmp/pattern of=/dev/$d bs=65536 seek={RAW_OFFSET // 65536} oflag=direct conv=fsync,notrunc || fwdie raw_write
dd if=/dev/$d of=/tmp/back bs=65536 skip={RAW_OFFSET // 65536} count=64 iflag=direct || fwdie raw_read
cmp /tmp/pattern /tmp/back || fwdie raw_compare

step throughput
rate() {{ awk -v a="$1" -v b="$2" -v n="${{3:-16}}" 'BEGIN {{ printf "%.1f", n / (b - a) }}'; }}
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of=/dev/$d bs=1048576 count=16 seek=8 oflag=direct 2>/dev/null || fwdie throughput_write
t1=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/$d of=/dev/null bs=1048576 count=16 skip=8 iflag=direct 2>/dev/null || fwdie throughput_read
t2=$(cut -d' ' -f1 /proc/uptime)
mark write_mib_s=$(rate $t0 $t1) read_mib_s=$(rate $t1 $t2)

step gpt
{write_gpt(PARTITIONS, "fwdie")}
mark partitions=$(sfdisk -d /dev/$d | grep -c 'name=')

step filesystems
mkfs.ext4 -q -F -L usbmirror /dev/${{d}}1 || fwdie mkfs_ext4
mkfs.fat -F 16 -n USBMIRROR /dev/${{d}}2 > /dev/null || fwdie mkfs_fat
mkdir -p /mnt/ext4 /mnt/fat
mount -t ext4 /dev/${{d}}1 /mnt/ext4 || fwdie mount_ext4
mount -t vfat /dev/${{d}}2 /mnt/fat || fwdie mount_vfat
for fs in ext4 fat; do
    i=0
    while [ $i -lt 12 ]; do
        dd if=/dev/urandom of=/mnt/$fs/f$i bs=1024 count=$((i * 37 + 1)) 2>/dev/null || fwdie write_$fs
        i=$((i + 1))
    done
    dd if=/dev/urandom of=/mnt/$fs/big bs=65536 count=48 2>/dev/null || fwdie write_big_$fs
    (cd /mnt/$fs && md5sum * > /tmp/$fs.md5)
done
sync
umount /mnt/ext4 || fwdie umount_ext4
umount /mnt/fat || fwdie umount_fat
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/${{d}}1 /mnt/ext4 || fwdie remount_ext4
mount -t vfat -o ro /dev/${{d}}2 /mnt/fat || fwdie remount_vfat
for fs in ext4 fat; do (cd /mnt/$fs && md5sum -c -s /tmp/$fs.md5) || fwdie verify_$fs; done
mark files_verified=$(cat /tmp/ext4.md5 /tmp/fat.md5 | wc -l)
umount /mnt/ext4; umount /mnt/fat

step fsck
e2fsck -f -n /dev/${{d}}1 > /tmp/e2fsck.out 2>&1 || {{ cat /tmp/e2fsck.out; fwdie e2fsck; }}
fsck.fat -n /dev/${{d}}2 > /dev/null || fwdie fsck_fat
mark fsck_ok=1

step discard
dd if=/dev/urandom of=/dev/${{d}}3 bs=65536 count=128 oflag=direct conv=fsync 2>/dev/null || fwdie fill_scratch
[ "$(cat /sys/block/$d/queue/discard_max_bytes)" = 0 ] && {{ echo unmap > $sd/provisioning_mode || fwdie provisioning; }}
blkdiscard /dev/${{d}}3 || fwdie blkdiscard
dd if=/dev/${{d}}3 bs=65536 iflag=direct 2>/dev/null | cmp -n {8 * MIB} - /dev/zero || fwdie not_zero_after_discard
mark discard_ok=1

# A reset in the middle of a large direct write: the SCSI layer retries, nothing is lost.
reset_mid_io() {{
    kind=$1
    dd if=/dev/urandom of=/tmp/big bs=65536 count=128 2>/dev/null
    dd if=/tmp/big of=/dev/${{d}}3 bs=65536 oflag=direct conv=fsync 2>/tmp/dd.err &
    DD=$!
    sleep 0.4
    sg_reset --$kind /dev/$sg || fwdie sg_reset_$kind
    wait $DD || {{ cat /tmp/dd.err; fwdie write_during_${{kind}}_reset; }}
    echo 3 > /proc/sys/vm/drop_caches
    dd if=/dev/${{d}}3 bs=65536 count=128 iflag=direct 2>/dev/null | cmp - /tmp/big || fwdie data_after_${{kind}}_reset
    [ -e /sys/block/$d ] || fwdie disk_gone_after_${{kind}}_reset
    mark reset_$kind=ok
}}
step bus_reset
reset_mid_io bus
step device_reset
reset_mid_io device

step replug
# Unplug and replug from the device side: the gadget unbound from the UDC and bound again behind the
# firmware's back (UNBIND, BIND, ENABLE). (dummy_hcd's soft_connect cannot be used: after
# "disconnect"/"connect" it never enumerates again, error -71, whatever the function.)
echo "" > /sys/kernel/config/usb_gadget/usbmirror/UDC || fwdie unbind
gone $d || fwdie disk_still_there_after_unplug
echo dummy_udc.0 > /sys/kernel/config/usb_gadget/usbmirror/UDC || fwdie rebind
d=$(wait_disk 40) || fwdie no_disk_after_replug
n=0; while [ ! -b /dev/${{d}}3 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
sg=$(ls /sys/block/$d/device/scsi_generic/)
dd if=/dev/${{d}}3 bs=65536 count=128 iflag=direct 2>/dev/null | cmp - /tmp/big || fwdie data_after_replug
mark replug=ok

step acm_console
python3 - <<'EOF' || fwdie acm_console
import serial, sys, time
# Right after a re-enumeration cdc_acm can fail the first open with EIO (its port activation races the
# new configuration); a host's terminal program simply opens again. Up to 10 s, and the count is shown.
deadline, retries = time.monotonic() + 10, 0
while True:
    try:
        port = serial.Serial("/dev/ttyACM0", 115200, timeout=10)
        break
    except serial.SerialException as exc:
        if time.monotonic() > deadline:
            raise
        retries += 1
        print("acm open retry", retries, exc)
        time.sleep(0.2)
print("@@USBMIRROR acm_open_retries=%d" % retries)
with port:
    port.write(b"anything typed is ignored\\r\\n")
    text = b""
    while text.count(b"--- end ---") < 2:
        chunk = port.read_until(b"--- end ---")
        if not chunk.endswith(b"--- end ---"):
            sys.exit("console went quiet: " + repr((text + chunk)[-200:]))
        text += chunk
block = text.decode().split("--- usbmirror status ---")[-1]
print(block)
assert "enabled: True" in block, block
print("@@USBMIRROR acm_console=ok")
EOF

step kill_restart
dd if=/dev/urandom of=/tmp/acked bs=65536 count=64 2>/dev/null
dd if=/tmp/acked of=/dev/${{d}}3 bs=65536 oflag=direct conv=fsync 2>/dev/null || fwdie acked_write
kill -9 $FW; wait $FW 2>/dev/null
gone $d || fwdie disk_still_there_after_kill
mark stale_gadget=$(ls /sys/kernel/config/usb_gadget/ | tr '\\n' ,)
start_fw
d=$(wait_disk 40) || fwdie no_disk_after_restart
mark disk_after_restart=$d
n=0; while [ ! -b /dev/${{d}}3 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
dd if=/dev/${{d}}3 bs=65536 count=64 iflag=direct 2>/dev/null | cmp - /tmp/acked || fwdie acked_data_lost
mount -t ext4 -o ro /dev/${{d}}1 /mnt/ext4 || fwdie mount_after_restart
(cd /mnt/ext4 && md5sum -c -s /tmp/ext4.md5) || fwdie ext4_after_restart
umount /mnt/ext4
mark restart_ok=1

step pyusb_board
# The real-board pyusb tests, run against this gadget: libusb detaches usb-storage, talks BOT itself,
# then gives the interface back to the kernel.
(cd /opt/usbmirror && python3 -m pytest -p no:cacheprovider --noconftest -c /dev/null -q -rs \
    host_tests/test_pyusb_board.py) > /tmp/pyusb.out 2>&1
mark pyusb_rc=$?
cat /tmp/pyusb.out
mark pyusb_passed=$(grep -o '[0-9]* passed' /tmp/pyusb.out | cut -d' ' -f1)
d=$(wait_disk 20) || fwdie no_disk_after_pyusb

step stop
kill -TERM $FW; wait $FW; mark fw_exit=$?
gone $d || fwdie disk_still_there_after_stop
mark gadget_left=$(ls /sys/kernel/config/usb_gadget/ | wc -l)
mark tracebacks=$(grep -c Traceback /tmp/fw.log)
{_never_configured_steps()}
{_super_speed_steps()}
{_cli_steps()}
{_held_write_steps()}
{_promote_gadget_steps()}
mark done=1
"""


def _super_speed_steps() -> str:
    """The same disk at super speed, in the same boot: dummy_hcd reloaded with is_super_speed=1 (the
    gadget is gone after the clean stop), the firmware enumerates again with the SuperSpeed
    descriptors and endpoint companions, the acknowledged data is still there, and a raw write and
    read round-trip at the new speed."""
    return r"""
step super_speed
rmmod dummy_hcd || fwdie rmmod_dummy_hcd
load_gadget_modules is_super_speed=1
[ -e /sys/class/udc/dummy_udc.0 ] || die no_super_speed_udc
start_fw
d=$(wait_disk 40) || fwdie no_disk_at_super_speed
mark super_speed=$(cat /sys/class/udc/dummy_udc.0/current_speed)
n=0; while [ ! -b /dev/${d}3 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
dd if=/dev/${d}3 bs=65536 count=64 iflag=direct 2>/dev/null | cmp - /tmp/acked || fwdie acked_data_at_super_speed
dd if=/dev/urandom of=/tmp/pattern_ss bs=65536 count=64 2>/dev/null
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/tmp/pattern_ss of=/dev/$d bs=65536 seek=@RAW@ oflag=direct conv=fsync,notrunc 2>/dev/null \
    || fwdie super_speed_write
t1=$(cut -d' ' -f1 /proc/uptime)
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/$d bs=65536 skip=@RAW@ count=64 iflag=direct 2>/dev/null | cmp - /tmp/pattern_ss || fwdie super_speed_read
t2=$(cut -d' ' -f1 /proc/uptime)
mark super_write_mib_s=$(rate $t0 $t1 4) super_read_mib_s=$(rate $t1 $t2 4)
kill -TERM $FW; wait $FW; mark super_fw_exit=$?
gone $d || fwdie disk_still_there_after_super_stop
mark super_gadget_left=$(ls /sys/kernel/config/usb_gadget/ | wc -l)
""".replace("@RAW@", str(RAW_OFFSET // 65536))


def _never_configured_steps() -> str:
    """A host that enumerates but never configures the device (here: not authorized), then SIGTERM:
    the firmware must still stop promptly and leave nothing behind."""
    return r"""
step never_configured
for hub in /sys/bus/usb/devices/usb*; do echo 0 > $hub/authorized_default; done
start_fw
n=0; while ! grep -qs '^0$' /sys/bus/usb/devices/*-1/authorized && [ $n -lt 200 ]; do sleep 0.1; n=$((n + 1)); done
grep -qs '^0$' /sys/bus/usb/devices/*-1/authorized || fwdie device_not_seen_unauthorized
sleep 1
( sleep 20; kill -9 $FW 2>/dev/null ) &
WD=$!
kill -TERM $FW; wait $FW; mark unconfigured_exit=$?
kill $WD 2>/dev/null
mark unconfigured_left=$(ls /sys/kernel/config/usb_gadget/ | wc -l)
"""


def _cli_steps() -> str:
    """The installed unit's own entry point: `usbmirror local --gadget` (journal, control socket, ACM
    console with the unit's status), `usbmirror status`, and the install self-test on real configfs."""
    return r"""
step cli_local_unit
mkdir -p /tmp/state
(cd /opt/usbmirror && exec python3 -m firmware.cli local --volume /tmp/disk.img --gadget dummy_udc.0 \
    --acm-console on --state-dir /tmp/state --journal-size 16M) > /tmp/unit.log 2>&1 &
UNIT=$!
d=$(wait_disk 60) || { tail -40 /tmp/unit.log; die cli_no_disk; }
n=0; while [ ! -b /dev/${d}3 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
dd if=/dev/${d}3 bs=65536 count=64 iflag=direct 2>/dev/null | cmp - /tmp/acked || die cli_sees_other_data
dd if=/tmp/big of=/dev/${d}3 bs=65536 oflag=direct conv=fsync 2>/dev/null || { tail -40 /tmp/unit.log; die cli_write; }
dd if=/dev/${d}3 bs=65536 count=128 iflag=direct 2>/dev/null | cmp - /tmp/big || die cli_read
python3 -m firmware.cli status --state-dir /tmp/state --json > /tmp/status.json || die cli_status
grep -q '"transport": "functionfs"' /tmp/status.json && mark cli_status=ok
python3 - <<'PY' || die cli_console
import serial
with serial.Serial("/dev/ttyACM0", 115200, timeout=10) as port:
    port.read_until(b"--- end ---")
    block = port.read_until(b"--- end ---").decode()
print(block)
assert "local unit" in block and "gadget udc dummy_udc.0" in block, block
print("@@USBMIRROR cli_console=ok")
PY
python3 - <<'PY' || die cli_selftest
from pathlib import Path
from firmware.selftest import SelftestConfig, run_selftest
r = run_selftest(SelftestConfig(state_dir=Path("/tmp/state"), gadget="dummy_udc.0", sync_probe_count=20))
print(r.to_json())
print("@@USBMIRROR selftest=" + ",".join(c.name.replace(" ", "_") + ":" + c.verdict.value for c in r.checks))
PY
kill -TERM $UNIT; wait $UNIT; mark cli_exit=$?
"""


def _held_write_steps() -> str:
    """ep0 while a WRITE waits: the journal's file system is frozen, so the host's WRITE is held in the
    firmware. usb-storage is then unbound (its command fails on the host side; the firmware still
    holds it) and the class requests go straight to the device from user space: GET_DESCRIPTOR,
    GET_MAX_LUN and the Bulk-Only class reset must all be answered while the command still waits (a
    host gives a control request 5 s, then resets the port). After the thaw the held command ends
    without a CSW, its data is on the disk exactly as written, and a later WRITE to the same blocks is
    not overwritten by a replay."""
    return r"""
step held_write
gone $d || die held_old_disk_stays
mkdir -p /tmp/jfs /tmp/state2
dd if=/dev/zero of=/tmp/jfs.img bs=1M count=48 2>/dev/null
mkfs.ext4 -q -F /tmp/jfs.img > /dev/null 2>&1 || die held_mkfs
mount -o loop /tmp/jfs.img /tmp/jfs || die held_mount
(cd /opt/usbmirror && exec python3 -m firmware.cli local --volume /tmp/disk.img --gadget dummy_udc.0 \
    --state-dir /tmp/state2 --journal /tmp/jfs/journal --journal-size 16M) > /tmp/unit2.log 2>&1 &
UNIT=$!
d=$(wait_disk 60) || { tail -40 /tmp/unit2.log; die held_no_disk; }
n=0; while [ ! -b /dev/${d}3 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
python3 - "$d" <<'PY' || { tail -30 /tmp/unit2.log; dmesg | tail -30; die held_write; }
import fcntl, glob, os, subprocess, sys, time
import usb.backend.libusb1, usb.core, usb.util
backend = usb.backend.libusb1.get_backend(find_library=lambda _: sorted(glob.glob("/usr/lib/*/libusb-1.0.so.0"))[0])
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
disk = sys.argv[1]
with open("/tmp/pattern", "wb") as f:
    f.write(bytes(range(256)) * 256)
dev_dir = next(p for p in glob.glob("/sys/bus/usb/devices/*") if os.path.exists(p + "/idVendor")
               and open(p + "/idVendor").read().strip() == "1209")
intf = os.path.basename(dev_dir) + ":1.0"
fs = os.open("/tmp/jfs", os.O_RDONLY)
fcntl.ioctl(fs, FIFREEZE, 0)
w = subprocess.Popen(["dd", "if=/tmp/pattern", f"of=/dev/{disk}3", "bs=65536", "count=1", "seek=10",
                      "oflag=direct"], stderr=subprocess.DEVNULL)
time.sleep(1.5)
assert w.poll() is None, "the WRITE was not held by the frozen journal"
with open("/sys/bus/usb/drivers/usb-storage/unbind", "w") as f:
    f.write(intf)
w.wait(timeout=30)
dev = usb.core.find(idVendor=0x1209, backend=backend)
assert dev is not None
usb.util.claim_interface(dev, 0)
t = time.monotonic()
desc = dev.ctrl_transfer(0x80, 6, 0x0100, 0, 18, timeout=5000)
t_desc = time.monotonic() - t
t = time.monotonic()
maxlun = dev.ctrl_transfer(0xA1, 0xFE, 0, 0, 1, timeout=5000)
t_lun = time.monotonic() - t
t = time.monotonic()
dev.ctrl_transfer(0x21, 0xFF, 0, 0, None, timeout=5000)
t_reset = time.monotonic() - t
still_held = "command finished after a reset" not in open("/tmp/unit2.log").read()
print(f"@@USBMIRROR held_ep0=desc:{len(desc)}:{t_desc * 1000:.1f}ms,maxlun:{list(maxlun)}:{t_lun * 1000:.1f}ms,"
      f"reset:{t_reset * 1000:.1f}ms")
print(f"@@USBMIRROR held_during_ep0={int(still_held)}")
fcntl.ioctl(fs, FITHAW, 0)
for _ in range(100):
    if "command finished after a reset, no CSW sent" in open("/tmp/unit2.log").read():
        break
    time.sleep(0.1)
usb.util.release_interface(dev, 0)
usb.util.dispose_resources(dev)
with open("/sys/bus/usb/drivers/usb-storage/bind", "w") as f:
    f.write(intf)
PY
d=$(wait_disk 60) || { tail -40 /tmp/unit2.log; die held_no_disk_after; }
n=0; while [ ! -b /dev/${d}3 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
dd if=/dev/${d}3 bs=65536 skip=10 count=1 iflag=direct 2>/dev/null | cmp - /tmp/pattern && mark held_data=ok
dd if=/dev/urandom of=/tmp/pattern2 bs=65536 count=1 2>/dev/null
dd if=/tmp/pattern2 of=/dev/${d}3 bs=65536 seek=10 oflag=direct conv=fsync 2>/dev/null || die held_second_write
sleep 1
dd if=/dev/${d}3 bs=65536 skip=10 count=1 iflag=direct 2>/dev/null | cmp - /tmp/pattern2 && mark held_no_replay=ok
mark held_no_csw=$(grep -c 'command finished after a reset, no CSW sent' /tmp/unit2.log)
kill -TERM $UNIT; wait $UNIT; mark held_exit=$?
umount /tmp/jfs
"""


def _promote_gadget_steps() -> str:
    """Switchover on the gadget, in the same boot: dummy_hcd again with two UDCs (two boards' worth of
    cables to one host). A local unit serves its disk on dummy_udc.0 and replicates over TLS to a remote
    unit in the guest; the local unit is killed; `usbmirror promote --gadget dummy_udc.1` serves the
    remote's copy as a second USB disk, the host finds the acknowledged data there and writes more;
    the old local unit restarts as a replica (its disk refuses writes) and catches up on the
    standby's writes while the copy is still promoted; `usbmirror failback` takes the promoted disk
    away, the local unit serves writes again, and they reach the remote."""
    return r"""
step promote_gadget
rmmod dummy_hcd || die pg_rmmod
load_gadget_modules num=2
[ -e /sys/class/udc/dummy_udc.1 ] || die pg_no_second_udc
chmod 600 /opt/tls/*.key
mkdir -p /tmp/pg
# disk_on N SECONDS: the disk whose host controller is dummy_hcd.N
disk_on() {
    lim=$(( $2 * 10 )); n=0
    while [ $n -lt $lim ]; do
        for b in /sys/block/sd*; do
            [ -e "$b" ] && readlink -f "$b" | grep -q "/dummy_hcd\.$1/" && [ -b "/dev/${b##*/}" ] \
                && { echo "${b##*/}"; return 0; }
        done
        n=$((n + 1)); sleep 0.1
    done
    return 1
}
pgdie() { echo "--- remote log"; tail -40 /tmp/pg/remote.log; echo "--- local log"; tail -40 /tmp/pg/local.log;
          dmesg | tail -20; die "$1"; }
# a short command (status, promote, failback); units are started with exec so that $! is the unit
um() { (cd /opt/usbmirror && exec python3 -m firmware.cli "$@"); }
# wait_status STATE_DIR PYTHON_CONDITION_ON_st SECONDS
wait_status() {
    python3 - "$@" <<'PY'
import json, subprocess, sys, time
state, cond, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline, st = time.monotonic() + limit, {}
while time.monotonic() < deadline:
    out = subprocess.run(["python3", "-m", "firmware.cli", "status", "--state-dir", state, "--json"],
                         cwd="/opt/usbmirror", capture_output=True, text=True).stdout
    try:
        st = json.loads(out)
    except ValueError:
        st = {}
    try:
        if eval(cond, {"st": st}):
            sys.exit(0)
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    time.sleep(0.5)
print("status never had", cond, json.dumps(st)[:2000])
sys.exit(1)
PY
}
(cd /opt/usbmirror && exec python3 -m firmware.cli remote --listen 127.0.0.1:7001 --name dr1 --tls-dir /opt/tls \
    --state-dir /tmp/pg/rstate --target server1=/tmp/pg/copy.img) > /tmp/pg/remote.log 2>&1 &
REM=$!
start_local() {
    (cd /opt/usbmirror && exec python3 -m firmware.cli local --volume /tmp/pg/vol.img --size 16M --gadget dummy_udc.0 \
        --state-dir /tmp/pg/lstate --journal-size 8M --source-id server1 --tls-dir /opt/tls \
        --remote 127.0.0.1:7001) >> /tmp/pg/local.log 2>&1 &
    LOC=$!
}
start_local
d=$(disk_on 0 60) || pgdie pg_no_local_disk
dd if=/dev/urandom of=/tmp/pg/one bs=65536 count=16 2>/dev/null
dd if=/tmp/pg/one of=/dev/$d bs=65536 oflag=direct conv=fsync 2>/dev/null || pgdie pg_write_one
# the remote has made durable everything the local unit's journal holds
DRAINED='st["remotes"][0]["state"] == "streaming"'
DRAINED="$DRAINED"' and int(st["remotes"][0]["acked_seq"]) >= int(st["journal"]["durable_seq"]) > 0'
wait_status /tmp/pg/lstate "$DRAINED" 90 || pgdie pg_not_drained
step pg_switchover
kill -9 $LOC; wait $LOC 2>/dev/null
gone $d || pgdie pg_local_disk_stays
wait_status /tmp/pg/rstate 'st["sources"][0]["state"] != "connected"' 30 || pgdie pg_source_still_connected
um promote --state-dir /tmp/pg/rstate --source server1 --gadget dummy_udc.1 > /tmp/pg/promote.out 2>&1 \
    || { cat /tmp/pg/promote.out; pgdie pg_promote; }
cat /tmp/pg/promote.out
p=$(disk_on 1 60) || pgdie pg_no_promoted_disk
dd if=/dev/$p bs=65536 count=16 iflag=direct 2>/dev/null | cmp - /tmp/pg/one || pgdie pg_promoted_differs
mark pg_promoted=ok
wait_status /tmp/pg/rstate 'st["sources"][0]["primary"] is True' 10 && mark pg_remote_primary=ok
dd if=/dev/urandom of=/tmp/pg/two bs=65536 count=4 2>/dev/null
dd if=/tmp/pg/two of=/dev/$p bs=65536 seek=32 oflag=direct conv=fsync 2>/dev/null || pgdie pg_standby_write
step pg_replica
start_local
d=$(disk_on 0 60) || pgdie pg_no_replica_disk
wait_status /tmp/pg/lstate 'st["host_writes"] == "refused" and st["primary"] is False' 90 || pgdie pg_not_a_replica
dd if=/tmp/pg/two of=/dev/$d bs=65536 count=1 oflag=direct 2>/dev/null && pgdie pg_replica_took_a_write
dd if=/tmp/pg/vol.img bs=65536 count=16 2>/dev/null | cmp - /tmp/pg/one && mark pg_replica_refused=ok
# the replica catches up while the copy is still promoted: the standby's writes reach its volume
wait_status /tmp/pg/lstate '(st.get("catch_up") or {}).get("bytes_moved", 0) >= 262144' 90 || pgdie pg_no_catch_up
mark pg_catch_up_moved=$(um status --state-dir /tmp/pg/lstate --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["catch_up"]["bytes_moved"])')
dd if=/tmp/pg/vol.img bs=65536 skip=32 count=4 2>/dev/null | cmp - /tmp/pg/two && mark pg_caught_up=ok
step pg_failback
um failback --state-dir /tmp/pg/rstate --source server1 --timeout 120 > /tmp/pg/failback.out 2>&1 \
    || { cat /tmp/pg/failback.out; pgdie pg_failback; }
cat /tmp/pg/failback.out
gone $p || pgdie pg_promoted_disk_stays
wait_status /tmp/pg/lstate 'st["host_writes"] == "accepted" and st["primary"] is True' 60 || pgdie pg_not_primary_again
dd if=/tmp/pg/vol.img bs=65536 skip=32 count=4 2>/dev/null | cmp - /tmp/pg/two && mark pg_failback_data=ok
mark pg_moved=$(um status --state-dir /tmp/pg/lstate --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["last_resync"]["bytes_moved"])')
step pg_after_failback
# the host sees the disk writable again once it revalidates it (a replica's disk was write-protected)
echo 1 > /sys/block/$d/device/rescan
blockdev --setrw /dev/$d 2>/dev/null
dd if=/dev/urandom of=/tmp/pg/three bs=65536 count=4 2>/dev/null
dd if=/tmp/pg/three of=/dev/$d bs=65536 seek=48 oflag=direct conv=fsync 2>/dev/null || pgdie pg_write_after_failback
wait_status /tmp/pg/lstate "$DRAINED" 90 || pgdie pg_not_drained_after_failback
kill -TERM $LOC; wait $LOC; mark pg_local_exit=$?
kill -TERM $REM; wait $REM; mark pg_remote_exit=$?
dd if=/tmp/pg/vol.img bs=65536 skip=48 count=4 2>/dev/null | cmp - /tmp/pg/three && mark pg_third_write=ok
cmp /tmp/pg/vol.img /tmp/pg/copy.img && mark pg_copies_equal=ok
mark pg_tracebacks=$(cat /tmp/pg/remote.log /tmp/pg/local.log | grep -c Traceback)
"""


@dataclass(frozen=True)
class GadgetGuest:
    image: GuestImage
    extra_files: dict[str, bytes]


@pytest.fixture(scope="module")
def gadget_guest() -> GadgetGuest:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: apt-get install -y qemu-system-x86 (make setup does it)")
    from hw.qemu.build_guest import GuestBuilder
    from hw.qemu.gadget_layer import gadget_extra_files

    try:
        return GadgetGuest(GuestBuilder().build(python=True), gadget_extra_files())
    except BuildError as exc:
        pytest.fail(f"gadget guest could not be built: {exc}")


@pytest.mark.timeout(840)
def test_disk_through_the_real_gadget_stack(gadget_guest: GadgetGuest, tmp_path: Path) -> None:
    """One boot: the whole workload at high speed (a Pi-class board's controller), then dummy_hcd
    again at super speed for the SuperSpeed descriptors, `usbmirror local --gadget` and ep0 while a
    WRITE is held, then a switchover and failback with `usbmirror promote --gadget`."""
    from hw.qemu.gadget_layer import run_gadget_guest

    pair = usbmirror("pair", str(tmp_path / "tls"), "--remote", "dr1", "--source", "server1")
    assert pair.returncode == 0, pair.stderr
    tls = {f"/opt/tls/{f.name}": f.read_bytes() for f in (tmp_path / "tls").iterdir() if f.name != "ca.key"}
    board_test = {"/opt/usbmirror/host_tests/test_pyusb_board.py": (REPO / "host_tests/test_pyusb_board.py").read_bytes()}
    result: GuestResult = run_gadget_guest(_script(), timeout=720, image=gadget_guest.image,
                                           extra_files={**gadget_guest.extra_files, **board_test, **tls})
    m = result.markers
    assert result.rc == 0 and m.get("done") == "1", result.describe()
    print(f"gadget high speed: 16 MiB O_DIRECT write {m.get('write_mib_s')} MiB/s, read {m.get('read_mib_s')} MiB/s; "
          f"super speed: 4 MiB write {m.get('super_write_mib_s')} MiB/s, read {m.get('super_read_mib_s')} MiB/s; "
          f"guest wall {result.wall:.0f} s")
    assert m["speed"] == "high-speed", result.describe()
    assert m.get("serial_ok") == "1", "unit serial number (VPD 0x80) not what the gadget was given"
    assert m["blocks"] == str(64 * MIB // SECTOR)
    assert m["partitions"] == "3"
    assert m["files_verified"] == "26"
    assert m.get("fsck_ok") == "1" and m.get("discard_ok") == "1"
    assert m.get("reset_bus") == "ok" and m.get("reset_device") == "ok"
    assert m.get("replug") == "ok"
    assert m.get("acm_console") == "ok"
    assert m["stale_gadget"] == "usbmirror,", "the killed firmware left no gadget behind?"
    assert m.get("restart_ok") == "1"
    assert m["pyusb_rc"] == "0" and m["pyusb_passed"] == "6", result.describe()
    assert m["fw_exit"] == "0", result.describe()
    assert m["gadget_left"] == "0", "clean stop must remove the gadget from configfs"
    assert m["tracebacks"] == "0", result.describe()
    assert m["unconfigured_exit"] == "0", "SIGTERM while never configured: " + result.describe()
    assert m["unconfigured_left"] == "0", result.describe()
    # super speed, same disk image
    assert m["super_speed"] == "super-speed", result.describe()
    assert m["super_fw_exit"] == "0" and m["super_gadget_left"] == "0", result.describe()
    # GET_DESCRIPTOR, GET_MAX_LUN and the class reset were answered while a WRITE waited for a
    # frozen journal; the held command then ended without a CSW and its data landed exactly once
    assert m.get("held_during_ep0") == "1", result.describe()
    ep0 = m.get("held_ep0", "")
    assert ep0.startswith("desc:18:") and ",maxlun:[0]:" in ep0 and ",reset:" in ep0, result.describe()
    assert m.get("held_no_csw") == "1", result.describe()
    assert m.get("held_data") == "ok" and m.get("held_no_replay") == "ok", result.describe()
    assert m.get("held_exit") == "0", result.describe()
    print(f"ep0 while a WRITE waits for the journal: {ep0}")
    assert m.get("cli_status") == "ok" and m.get("cli_console") == "ok", result.describe()
    assert m["selftest"] == ("udc:PASS,gadget_binding:PASS,unit_running:PASS,host_enumerated:PASS,"
                             "host_profile:PASS,journal_device:PASS"), result.describe()
    assert m["cli_exit"] == "0", result.describe()
    # switchover on the gadget: the copy served by promote --gadget holds what the killed local unit
    # acknowledged, the returning local unit refuses writes and catches up, failback hands the source back
    assert m.get("pg_promoted") == "ok" and m.get("pg_remote_primary") == "ok", result.describe()
    assert m.get("pg_replica_refused") == "ok", result.describe()
    # the replica's catch-up pulled the standby's 256 KiB before the failback, which had little left
    assert m.get("pg_caught_up") == "ok" and 4 * 65536 <= int(m["pg_catch_up_moved"]) < 16 * MIB, result.describe()
    assert m.get("pg_failback_data") == "ok", result.describe()
    assert 0 <= int(m["pg_moved"]) < 16 * MIB, result.describe()
    assert m.get("pg_third_write") == "ok" and m.get("pg_copies_equal") == "ok", result.describe()
    assert m["pg_local_exit"] == m["pg_remote_exit"] == "0" and m["pg_tracebacks"] == "0", result.describe()
