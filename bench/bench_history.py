"""Point-in-time history on a remote: the cost of before-images, expose latency, restore rate.

Run: `.venv/bin/python bench/bench_history.py [--size 1G] [--seconds S] [--dir DIR] [--json]`

In one run, on one target file:
  raw    4 KiB pwrite + fdatasync per second on that target (the bound of a local unit's durable
         rate at QD1);
  apply  4 KiB random writes through the remote's TargetStore in batches of 64, synced once per
         batch as the remote does per acknowledged position: records/s with history off and on, on
         the same (fully written) target, in alternating quarter-second slices so that both meet the
         same disk and neighbours (target: on >= 0.5 x off, and on >= the raw durable rate, so
         replication keeps up);
then a target of --size with as much history behind it (64 KiB random writes):
  expose time from `expose` (history opened, point resolved, view pinned, USB/IP listening) to the
         first READ(10) answered to a client that imports the disk, against the same for the plain
         target served by a Volume (target: under 1 s);
  restore rate of `restore` of the oldest point against a plain copy of the target (read, write,
         fsync) in the same run.
Files go to a temporary directory on a real disk (not a tmpfs); figures vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware.history import HistoryWriter, history_dir
from firmware.history_cli import exposed, run_restore
from firmware.link import protocol as jp
from firmware.scsi import ScsiTarget
from firmware.target_store import TargetStore
from firmware.volume import Volume, parse_size
from gadget.descriptors import DeviceIdentity
from gadget.usbip_server import UsbipServer
from host_tests.usbip_support import UsbipClient

KIB, MIB = 1 << 10, 1 << 20
BS = 512
BATCH = 64


def raw_durable_rate(path: Path, seconds: float) -> float:
    fd = os.open(path, os.O_RDWR)
    blocks = os.fstat(fd).st_size // (4 * KIB)
    buf = os.urandom(4 * KIB)
    n, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            os.pwrite(fd, buf, random.randrange(blocks) * 4 * KIB)
            os.fdatasync(fd)
            n += 1
    finally:
        os.close(fd)
    return n / (time.monotonic() - t0)


def apply_rates(state: Path, target: Path, size: int, seconds: float, *, slice_s: float = 0.25) -> tuple[float, float]:
    """4 KiB random writes through TargetStore.apply, one sync per batch, as the remote applies:
    records/s with history off and on, on the same target, in alternating slices of `slice_s` (the
    history hook is attached for the "on" slices), so that both see the same disk and the same
    neighbours on a shared machine."""
    store = TargetStore("s1", str(target), str(state))
    vol = store.open(size, BS)
    w = HistoryWriter.open(history_dir(state, "s1"), block_size=BS, num_blocks=size // BS, volume_uuid="00" * 16,
                           generation=1, target=str(target), base_seq=0, size_cap=1 << 30, age_s=86400.0)
    payload = os.urandom(4 * KIB)
    nb = size // (4 * KIB)
    seq = 0
    done = {False: 0, True: 0}
    spent = {False: 0.0, True: 0.0}
    try:
        while spent[True] < seconds:
            for history in (False, True):
                store.hooks = [w] if history else []
                t0 = time.monotonic()
                while time.monotonic() - t0 < slice_s:
                    recs = []
                    for _ in range(BATCH):
                        seq += 1
                        recs.append(jp.Record(seq, jp.RecordKind.WRITE, random.randrange(nb) * 8, 8, time.time_ns(),
                                              payload))
                    store.apply(recs)
                    vol.flush()
                    done[history] += BATCH
                spent[history] += time.monotonic() - t0
        return done[False] / spent[False], done[True] / spent[True]
    finally:
        store.hooks = []
        w.close()
        store.close()


def fill(path: Path, size: int) -> None:
    """A target as a remote holds one after its first sync: every block written."""
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())


def build_history(state: Path, target: Path, size: int) -> int:
    """Fill the target with data, then 64 KiB random writes until the history holds `size` bytes."""
    fill(target, size)
    store = TargetStore("s1", str(target), str(state))
    vol = store.open(size, BS)
    w = HistoryWriter.open(history_dir(state, "s1"), block_size=BS, num_blocks=size // BS, volume_uuid="11" * 16,
                           generation=1, target=str(target), base_seq=0, size_cap=size + 64 * MIB, age_s=86400.0)
    store.add_hook(w)
    payload = os.urandom(64 * KIB)
    seq = 0
    try:
        while w.index.size < size:
            recs = []
            for _ in range(16):
                seq += 1
                lba = random.randrange(size // (64 * KIB)) * 128
                recs.append(jp.Record(seq, jp.RecordKind.WRITE, lba, 128, time.time_ns(), payload))
            store.apply(recs)
            vol.flush()
        return w.index.size
    finally:
        w.close()
        store.close()


def _first_read(port: int) -> None:
    with UsbipClient("127.0.0.1", port) as c:
        c.import_device("1-1")
        c.enumerate()
        c.until_ready()
        c.read10(12345, 8)


def expose_first_read(state: Path) -> float:
    t0 = time.monotonic()
    with exposed(str(state), "s1", ("127.0.0.1", 0), seq=0) as ex:
        assert ex.address is not None  # served over USB/IP
        _first_read(ex.address[1])
        return time.monotonic() - t0


def plain_first_read(target: Path, size: int) -> float:
    t0 = time.monotonic()
    with Volume(str(target), size=size, block_size=BS, read_only=True) as vol:
        lu = ScsiTarget(vol, serial="0123456789AB", device_id=bytes(range(8)), read_only=True)
        with UsbipServer.for_logical_unit(lu, DeviceIdentity(serial="0123456789AB")) as srv:
            _first_read(srv.port)
            return time.monotonic() - t0


def plain_copy(src: Path, dst: Path) -> float:
    t0 = time.monotonic()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(MIB):
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return os.path.getsize(src) / (time.monotonic() - t0)


def _is_tmpfs(path: str) -> bool:
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype in ("tmpfs", "ramfs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="target size, and as much history (default 1G)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per rate measurement")
    ap.add_argument("--dir", default=None, help="where the files go (default: a temp dir on a real disk)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    size = parse_size(a.size)
    base = a.dir or ("/var/tmp" if _is_tmpfs(tempfile.gettempdir()) else None)
    root = Path(tempfile.mkdtemp(prefix="bench-history-", dir=base))
    out: dict[str, float] = {}
    try:
        small = 256 * MIB
        t = root / "apply.img"
        fill(t, small)
        out["raw_durable_4k_per_s"] = raw_durable_rate(t, a.seconds)
        (root / "apply").mkdir()
        out["apply_off_per_s"], out["apply_on_per_s"] = apply_rates(root / "apply", t, small, a.seconds)
        t.unlink()
        shutil.rmtree(root / "apply")

        state = root / "state"
        state.mkdir()
        target = root / "target.img"
        out["history_bytes"] = build_history(state, target, size)
        out["expose_first_read_s"] = expose_first_read(state)
        out["plain_first_read_s"] = plain_first_read(target, size)
        out["copy_bytes_per_s"] = plain_copy(target, root / "copy.img")
        (root / "copy.img").unlink()
        r = run_restore(str(state), "s1", str(root / "restored.img"), seq=0)
        out["restore_bytes_per_s"] = r.bytes / r.seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    rows = [
        ("apply 4 KiB, history on vs off (records/s)", out["apply_on_per_s"], out["apply_off_per_s"], "/s"),
        ("apply 4 KiB with history vs raw 4 KiB durable writes/s", out["apply_on_per_s"],
         out["raw_durable_4k_per_s"], "/s"),
        (f"expose to first read, {a.size} target + {out['history_bytes'] / MIB:.0f} MiB history vs plain target (s)",
         out["expose_first_read_s"], out["plain_first_read_s"], " s"),
        ("restore vs plain copy of the target (MiB/s)", out["restore_bytes_per_s"] / MIB,
         out["copy_bytes_per_s"] / MIB, " MiB/s"),
    ]
    print(f"{'figure':<88} {'usbmirror':>12} {'raw, same run':>14} {'ratio':>6}")
    for name, v, raw, unit in rows:
        print(f"{name:<88} {v:>10.2f}{unit:<2} {raw:>12.2f}{unit:<2} {v / raw:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
