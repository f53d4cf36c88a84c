"""kill -9 of the real local unit while Debian's kernel writes to it; restart; nothing acknowledged is lost.

One guest boot, two phases. Phase 1: the guest attaches the disk and, at the same time,
* runs fio sequential 4 KiB writes with crc32c verify information (O_DIRECT) over a region; fio saves
  its verify state (how far its writes had completed) when the device goes away;
* writes numbered 4 KiB blocks with O_DIRECT one at a time and prints the number of each block whose
  write completed (`@@USBMIRROR ack=N`).
A host thread watches `usbmirror status --json` until the journal's head sequence passes a threshold,
SIGKILLs the unit mid-run and starts it again on the same volume, journal, state dir and USB/IP port.
The guest's I/O fails (expected). Phase 2: the guest re-attaches (the relay reaches the same port),
runs fio `--verify_only --verify_state_load=1` over everything fio saw complete, and reads every
acknowledged block back. Afterwards the host checks the acknowledged blocks in the volume file itself,
and that the remote unit (TLS) still ends up byte-identical to the local volume. With a `sync`
remote, the remote target read right after the kill already holds every acknowledged block.

Run with the write cache off (every WRITE durable before its CSW) and on (WRITEs may complete from
RAM, so fio writes with O_SYNC and each numbered block is followed by an fsync: a write counts as
acknowledged only after a FUA write or SYNCHRONIZE CACHE covered it; only those must survive the kill).
"""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import pytest

from host_tests.units import Status, UnitProcess, Units, drained, first_difference, streaming, usbmirror
from hw.qemu.build_guest import GuestImage
from hw.qemu.guest import MARKER, run_guest

pytestmark = [pytest.mark.realkernel, pytest.mark.slow]

MIB = 1 << 20
BLOCK = 4096
DISK_MIB = 64
FIO_OFFSET_MIB, FIO_SIZE_MIB = 8, 32          # fio region: far more than it can write before the kill
ACK_BASE = 48 * MIB // BLOCK                   # numbered blocks from 48 MiB on
ACK_BLOCKS = 1024
KILL_AFTER_RECORDS = 400                       # journal records written before the host kills the unit
KILL_AFTER_BLOCK = 20                          # ... and numbered block 20 has reached the volume file
ACK_RE = re.compile(rf"^{MARKER} ack=(\d+)\s*$", re.M)

FIO_JOB = (f"--name=crash --filename=/dev/$DISK --offset={FIO_OFFSET_MIB}M --size={FIO_SIZE_MIB}M --bs=4k "
           "--rw=write --direct=1 --ioengine=psync --verify=crc32c")

GUEST_SCRIPT_TEMPLATE = f"""
set -u
cd /tmp
step attach
usbip_attach 1-1 || die attach
DISK=$(wait_disk 30) || die no_disk
mark disk1=$DISK

step write_until_killed
fio {FIO_JOB} @FIO_SYNC@ --do_verify=1 --verify_state_save=1 --minimal >/tmp/fio-write.out 2>&1 &
fiopid=$!
i=0
while [ $i -lt {ACK_BLOCKS} ]; do
    [ -b /dev/$DISK ] || break
    dd if=/blocks.bin of=/dev/$DISK bs={BLOCK} skip=$i seek=$(({ACK_BASE} + i)) count=1 oflag=direct \\
        conv=@DD_CONV@ 2>/dev/null || break
    mark ack=$i
    i=$((i + 1))
done
mark ack_loop_end=$i
wait $fiopid
mark fio_write_rc=$?
tail -n 3 /tmp/fio-write.out
[ -f /dev/$DISK ] && die "a regular file replaced /dev/$DISK: the acknowledgements are not from the disk"
[ $i -lt {ACK_BLOCKS} ] || die "the numbered-block loop finished: the unit was never killed"
ls /tmp/*verify.state >/dev/null 2>&1 || die "fio saved no verify state"
mark fio_state=$(ls /tmp/*verify.state | tr '\\n' ,)

step reattach
reattach_after_restart $DISK 180
DISK=$(wait_disk 30) || die no_disk_after_restart
mark disk2=$DISK

step verify
fio {FIO_JOB} --verify_only --verify_state_load=1 --verify_fatal=1 --minimal >/tmp/fio-verify.out 2>&1 \\
    || {{ cat /tmp/fio-verify.out; die fio_verify_only; }}
mark fio_verified_kib=$(cut -d';' -f7 /tmp/fio-verify.out)
acks=$i
dd if=/dev/$DISK bs={BLOCK} skip={ACK_BASE} count=$acks iflag=direct 2>/dev/null >/tmp/acked.bin || die read_acked
head -c $((acks * {BLOCK})) /blocks.bin | cmp - /tmp/acked.bin || die acknowledged_block_lost
mark acked_verified=$acks

step detach
usbip detach -p 0 >/dev/null 2>&1 || die detach
mark done=1
"""


def guest_script(write_cache: str) -> str:
    durable = write_cache == "on"
    return (GUEST_SCRIPT_TEMPLATE.replace("@FIO_SYNC@", "--sync=1" if durable else "")
            .replace("@DD_CONV@", "notrunc,fsync" if durable else "notrunc"))


def block_pattern(i: int) -> bytes:
    head = f"usbmirror acknowledged block {i:06d}\n".encode()
    return head + random.Random(i).randbytes(BLOCK - len(head))


def block_in_file(path: Path, i: int) -> bool:
    with open(path, "rb") as f:
        f.seek((ACK_BASE + i) * BLOCK)
        return f.read(BLOCK) == block_pattern(i)


class Crasher(threading.Thread):
    """Waits until the journal passes ``threshold`` records and numbered block ``block`` shows in the
    volume (so both writers are mid-run), SIGKILLs the unit and starts it again."""

    def __init__(self, unit: UnitProcess, volume: Path, threshold: int, block: int,
                 remote_target: Path | None = None) -> None:
        super().__init__(name="crasher", daemon=True)
        self.unit = unit
        self.volume = volume
        self.threshold = threshold
        self.block = block
        self.remote_target = remote_target
        self.remote_at_kill = b""   # the remote target's numbered-block region right after the kill
        self.before: Status | None = None
        self.after: Status | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.before = self.unit.wait_status(
                lambda st: st["journal"]["head_seq"] >= self.threshold and block_in_file(self.volume, self.block),
                timeout=240, interval=0.1, what="the guest's writes")
            self.unit.kill9()
            if self.remote_target is not None:
                with open(self.remote_target, "rb") as f:
                    f.seek(ACK_BASE * BLOCK)
                    self.remote_at_kill = f.read(ACK_BLOCKS * BLOCK)
            self.unit.launch()
            self.after = self.unit.wait_ready(120)
        except BaseException as exc:
            self.error = exc


@pytest.mark.parametrize(("write_cache", "mode"), [("off", "async"), ("on", "async"), ("off", "sync")])
def test_kill_9_mid_write_loses_nothing_acknowledged(write_cache: str, mode: str, units: Units, tmp_path: Path,
                                                     guest_image: GuestImage) -> None:
    tls = units.pair("dr1", ["server1"])
    volume, target = tmp_path / "local-volume.img", tmp_path / "remote-target.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
    local = units.start_local(volume=volume, size=f"{DISK_MIB}M", journal_size="64M", source_id="server1",
                              tls_dir=tls, remotes=[remote.address + ("" if mode == "async" else ",mode=sync")],
                              extra=["--write-cache", write_cache])
    local.wait_status(streaming(), what="the link to the remote")

    crasher = Crasher(local, volume, KILL_AFTER_RECORDS, KILL_AFTER_BLOCK,
                      remote_target=target if mode == "sync" else None)
    crasher.start()
    blocks = b"".join(block_pattern(i) for i in range(ACK_BLOCKS))
    res = run_guest(guest_script(write_cache), usbip_port=local.port, timeout=400, image=guest_image,
                    extra_files={"/blocks.bin": blocks})
    crasher.join(130)
    context = f"{res.describe()}\n{units.describe()}"
    assert crasher.error is None, f"killing/restarting the unit failed: {crasher.error}\n{context}"
    assert crasher.before is not None and crasher.after is not None, context
    assert res.rc == 0 and res.markers.get("done") == "1", f"guest failed\n{context}"
    print(f"guest markers (write cache {write_cache}, {mode} remote): {res.markers} wall={res.wall:.1f}s")

    acked = sorted(int(n) for n in ACK_RE.findall(res.output))
    assert acked == list(range(len(acked))), "numbered blocks are acknowledged in order"
    assert acked, f"no numbered block was acknowledged before the kill\n{context}"
    assert int(res.markers["fio_write_rc"]) != 0, "fio should have seen the device vanish"
    assert int(res.markers["fio_verified_kib"]) > 0, "fio verified nothing: its state held no completed write"
    assert int(res.markers["acked_verified"]) == len(acked)

    if mode == "sync":
        # a sync remote had every block the guest saw acknowledged before the local unit died
        got = crasher.remote_at_kill
        missing = [i for i in acked if got[i * BLOCK:(i + 1) * BLOCK] != block_pattern(i)]
        assert not missing, f"acknowledged blocks not on the sync remote at the kill: {missing[:20]}"

    # the restarted unit recovered the journal it had before the kill
    jb, ja = crasher.before["journal"], crasher.after["journal"]
    assert ja["recovery"]["created"] is False and ja["recovery"]["records_scanned"] > 0, ja["recovery"]
    assert ja["head_seq"] >= jb["durable_seq"], f"records durable before the kill are gone: {jb} -> {ja}"
    assert crasher.after["pid"] != crasher.before["pid"]
    assert crasher.after["write_cache"] == write_cache
    if write_cache == "on":
        scsi = crasher.before["scsi"]
        assert scsi["flushes"] + scsi["fua_writes"] > 0, f"the guest never asked for durability: {scsi}"

    # the host's own look at the volume, through the restarted unit's files
    st = local.wait_status(drained, timeout=180, what="the remote to catch up after the restart")
    assert st["remotes"][0]["state"] == "streaming"
    v = usbmirror("verify", "--state-dir", str(local.state_dir), timeout=300)
    assert v.returncode == 0, f"usbmirror verify after the crash: {v.stdout}{v.stderr}\n{units.describe()}"
    assert local.stop() == 0 and remote.stop() == 0, units.describe()
    with open(volume, "rb") as f:
        for i in acked:
            f.seek((ACK_BASE + i) * BLOCK)
            assert f.read(BLOCK) == block_pattern(i), f"acknowledged block {i} is not in the volume file"
    diff = first_difference(volume, target)
    assert diff is None, f"after the crash the remote differs from the local volume at byte {diff}"
