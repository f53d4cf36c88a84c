"""Journal and local-unit throughput against the raw rate of the same pre-written journal file.

Run: `.venv/bin/python bench/bench_journal.py [--seconds S] [--rounds N] [--dir DIR] [--json]`

In one run it measures, on one pre-written journal file:
  raw   4 KiB pwrite + fdatasync overwrites per second and p99 latency;
  raw   120 KiB pwrite + fdatasync bandwidth and p99 latency;
then a LocalUnit (journal + file volume) through its BlockStore API:
  write cache off, 4 KiB random writes: durable writes/s   (target >= 50% of raw 4 KiB/s)
  write cache off, p99 acknowledgement latency             (target <= 2x raw 4 KiB p99)
  write cache off, 120 KiB sequential: bandwidth           (target >= 50% of raw 120 KiB)
  write cache on, 120 KiB sequential, flush every 1 MiB    (target >= 80% of raw 120 KiB)
and the seconds to recover a full 1 GiB journal (open + scan + verify every checksum), and to replay
it all onto a volume. Files go to a temporary directory on a real disk (not a tmpfs /tmp); figures
are from a shared machine and vary from run to run.
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
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware.journal import Journal, RecordKind
from firmware.journal.flash import FileFlash
from firmware.journal.format import RING_OFFSET
from firmware.local_unit import LocalUnit, ThrottlePolicy
from firmware.volume import Volume

KIB = 1024
MIB = 1024 * 1024
UNIT = uuid.UUID("b3c4a5d6-0000-4000-8000-00000000be0c")
BS = 512


def _is_tmpfs(path: str) -> bool:
    try:
        with open("/proc/mounts") as f:
            best, fstype = "", ""
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fstype = parts[1], parts[2]
            return fstype in ("tmpfs", "ramfs")
    except OSError:
        return False


def _p99(lat: list[float]) -> float:
    s = sorted(lat)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def raw_rate(path: Path, size: int, seconds: float, lat: list[float]) -> tuple[int, float]:
    """pwrite(size) + fdatasync overwrites of the ring for `seconds`: (count, elapsed); latencies
    are appended to `lat`."""
    fd = os.open(path, os.O_RDWR)
    try:
        ring = os.fstat(fd).st_size - RING_OFFSET
        buf = os.urandom(size)
        off = 0
        n = 0
        t_end = time.perf_counter() + seconds
        t0 = time.perf_counter()
        while True:
            a = time.perf_counter()
            if a >= t_end:
                break
            if off + size > ring:
                off = 0
            os.pwrite(fd, buf, RING_OFFSET + off)
            os.fdatasync(fd)
            off += size
            n += 1
            lat.append(time.perf_counter() - a)
        return n, time.perf_counter() - t0
    finally:
        os.close(fd)


def unit_rate(lu: LocalUnit, size: int, seconds: float, lat: list[float], *, sequential: bool,
              flush_every: int | None = None, start_lba: int = 0) -> tuple[int, float]:
    """LocalUnit.write of `size` bytes for `seconds`, optionally with a flush every N bytes (the
    flush's time counts in the total, not in the per-write latency): (count, elapsed)."""
    nblocks = size // BS
    span = lu.num_blocks - nblocks
    data = os.urandom(size)
    rng = random.Random(start_lba)
    lba = start_lba % span
    since_flush = 0
    n = 0
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while True:
        a = time.perf_counter()
        if a >= t_end:
            break
        if sequential:
            if lba > span:
                lba = 0
            at = lba
            lba += nblocks
        else:
            at = rng.randrange(0, span // 8) * 8
        lu.write(at, data)
        n += 1
        lat.append(time.perf_counter() - a)
        if flush_every is not None:
            since_flush += size
            if since_flush >= flush_every:
                lu.flush()
                since_flush = 0
    if flush_every is not None:
        lu.flush()
    return n, time.perf_counter() - t0


def recovery(tmp: Path, journal_bytes: int, rec: int) -> dict[str, float]:
    """Fill a journal of `journal_bytes` with records of `rec` bytes (a consumer that never confirms
    holds every record), then time opening it (scan + checksums) and a LocalUnit start that replays
    every record onto a volume."""
    jpath = tmp / "full.journal"
    vol = tmp / "full.volume"
    for p in (jpath, vol, tmp / "full.dirty"):
        p.unlink(missing_ok=True)
    payload = os.urandom(rec)
    with Journal.open(jpath, size=journal_bytes + RING_OFFSET, unit_uuid=UNIT, block_size=BS) as j:
        j.register_consumer("remote")
        n = 0
        nblk = rec // BS
        vol_blocks = 1 << 21  # 1 GiB volume
        while j.fits(rec):
            j.append(RecordKind.WRITE, (n * nblk) % (vol_blocks - nblk), nblk, payload, time.time_ns())
            n += 1
            if n % max(1, (4 * MIB) // rec) == 0:
                j.sync()
        j.sync()
        filled = j.used_bytes
    t0 = time.perf_counter()
    with Journal.open(jpath, size=None, unit_uuid=UNIT, block_size=BS) as j:
        t_open = time.perf_counter() - t0
        records = j.recovery.records
        with Volume(vol, size=vol_blocks * BS, block_size=BS) as v:
            t1 = time.perf_counter()
            with LocalUnit(v, j, bitmap_path=str(tmp / "full.dirty")) as lu:
                t_replay = time.perf_counter() - t1
                replayed = lu.replayed_records
    return {"journal_bytes": float(filled), "records": float(records), "open_scan_s": t_open,
            "replayed_records": float(replayed), "replay_s": t_replay}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.4, help="duration of each figure in each round")
    ap.add_argument("--rounds", type=int, default=16, help="rounds; raw and local unit alternate in each")
    ap.add_argument("--journal-size", default=256 * MIB, type=int, help="journal file size in bytes")
    ap.add_argument("--recovery-size", default=1 << 30, type=int, help="journal size for the recovery test")
    ap.add_argument("--settle", type=float, default=0.5, help="pause after each local-unit phase (s)")
    ap.add_argument("--dir", help="where to put the files (default: a temp dir on a real disk)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args()

    base = args.dir or tempfile.gettempdir()
    if args.dir is None and _is_tmpfs(base):
        base = str(Path(__file__).resolve().parent.parent)
    tmp = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=base))
    out: dict[str, float] = {}
    try:
        jpath = tmp / "journal"
        flash = FileFlash.create(jpath, args.journal_size + RING_OFFSET)
        flash.close()
        print(f"journal file {jpath} ({args.journal_size // MIB} MiB, pre-written); {args.rounds} rounds of "
              f"{args.seconds:.1f} s per figure, raw and local unit interleaved")
        names = ("raw_4k", "raw_120k", "wc_off_4k", "wc_off_120k", "wc_on_120k")
        rounds: dict[str, list[tuple[int, float, float]]] = {k: [] for k in names}  # count, secs, p99
        lats: dict[str, list[float]] = {k: [] for k in names}

        def add(name: str, res: tuple[int, float], lat: list[float]) -> None:
            rounds[name].append((res[0], res[1], _p99(lat) if lat else 0.0))
            lats[name].extend(lat)

        def raw_phase() -> None:
            lat: list[float] = []
            add("raw_4k", raw_rate(jpath, 4 * KIB, args.seconds, lat), lat)
            lat = []
            add("raw_120k", raw_rate(jpath, 120 * KIB, args.seconds, lat), lat)

        def unit_phase(rnd: int) -> None:
            # the raw runs write over the ring: a fresh format of the same file for the local unit
            with FileFlash(jpath) as f:
                Journal.format(f, unit_uuid=UNIT, block_size=BS)
            with Volume(tmp / "volume", size=1 << 30, block_size=BS) as vol, \
                    Journal.open(jpath, size=None, unit_uuid=UNIT, block_size=BS) as j, \
                    LocalUnit(vol, j, bitmap_path=str(tmp / "dirty"), throttle=ThrottlePolicy()) as lu:
                lu.set_write_cache(False)
                lat: list[float] = []
                add("wc_off_4k", unit_rate(lu, 4 * KIB, args.seconds, lat, sequential=False,
                                           start_lba=rnd * 7919), lat)
                lat = []
                add("wc_off_120k", unit_rate(lu, 120 * KIB, args.seconds, lat, sequential=True,
                                             start_lba=rnd * (1 << 19)), lat)
                lu.set_write_cache(True)
                lat = []
                add("wc_on_120k", unit_rate(lu, 120 * KIB, args.seconds, lat, sequential=True,
                                            flush_every=MIB, start_lba=rnd * (1 << 19) + (1 << 20)), lat)
            # closing synced hundreds of MiB of volume data: let the disk settle before the next
            # figure, whichever it is, so neither side inherits the other's write-back
            time.sleep(args.settle)

        for rnd in range(args.rounds):  # alternate the order so slow drifts of the machine cancel out
            if rnd % 2:
                unit_phase(rnd)
                raw_phase()
            else:
                raw_phase()
                unit_phase(rnd)
        for k in names:
            out[f"{k}_ops"] = sum(c for c, _, _ in rounds[k]) / sum(t for _, t, _ in rounds[k])
            out[f"{k}_p99_s"] = _p99(lats[k])

        def median_ratio(a: str, b: str, *, p99: bool = False) -> float:
            rs = sorted((x[2] / y[2]) if p99 else (x[0] / x[1]) / (y[0] / y[1])
                        for x, y in zip(rounds[a], rounds[b], strict=True))
            return rs[len(rs) // 2]

        out["ratio_wc_off_4k_ops"] = median_ratio("wc_off_4k", "raw_4k")
        out["ratio_wc_off_4k_p99"] = median_ratio("wc_off_4k", "raw_4k", p99=True)
        out["ratio_wc_off_120k_bw"] = median_ratio("wc_off_120k", "raw_120k")
        out["ratio_wc_on_120k_bw"] = median_ratio("wc_on_120k", "raw_120k")
        out["raw_120k_bw"] = out["raw_120k_ops"] * 120 * KIB
        out["wc_off_120k_bw"] = out["wc_off_120k_ops"] * 120 * KIB
        out["wc_on_120k_flush1m_bw"] = out["wc_on_120k_ops"] * 120 * KIB
        for size, tag in ((128 * KIB, "recovery_128k"), (4 * KIB, "recovery_4k")):
            rec = recovery(tmp, args.recovery_size, size)
            out.update({f"{tag}_{k}": v for k, v in rec.items()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def row(name: str, val: float, raw: float, unit: str, ratio: float, target: str, ok: bool,
            scale: float = 1.0) -> None:
        pooled = val / raw if raw else 0.0
        print(f"  {name:<42} {val * scale:>9.1f} {unit:<6} raw {raw * scale:>9.1f} {unit:<6} "
              f"ratio {pooled:5.2f} (median of rounds {ratio:5.2f})  target {target:<7} "
              f"{'PASS' if ok else 'FAIL'}")

    print("local unit vs raw journal file (targets judged on the median of the per-round ratios)")
    r = out["ratio_wc_off_4k_ops"]
    row("write cache off, 4 KiB random, writes/s", out["wc_off_4k_ops"], out["raw_4k_ops"], "/s", r, ">= 0.50",
        r >= 0.5)
    r = out["ratio_wc_off_4k_p99"]
    row("write cache off, 4 KiB p99 ack latency", out["wc_off_4k_p99_s"], out["raw_4k_p99_s"], "ms", r,
        "<= 2.00", r <= 2.0, 1000.0)
    r = out["ratio_wc_off_120k_bw"]
    row("write cache off, 120 KiB sequential", out["wc_off_120k_bw"], out["raw_120k_bw"], "MiB/s", r,
        ">= 0.50", r >= 0.5, 1 / MIB)
    r = out["ratio_wc_on_120k_bw"]
    row("write cache on, 120 KiB, flush every 1 MiB", out["wc_on_120k_flush1m_bw"], out["raw_120k_bw"],
        "MiB/s", r, ">= 0.80", r >= 0.8, 1 / MIB)
    print(f"  (raw 120 KiB p99 {out['raw_120k_p99_s'] * 1000:.2f} ms; local unit 120 KiB p99 "
          f"{out['wc_off_120k_p99_s'] * 1000:.2f} ms)")
    for tag, what in (("recovery_128k", "128 KiB"), ("recovery_4k", "4 KiB")):
        print(f"recovery of a full {out[tag + '_journal_bytes'] / MIB:.0f} MiB journal of {what} records "
              f"({out[tag + '_records']:.0f}): open + scan + checksums {out[tag + '_open_scan_s']:.2f} s; "
              f"replay of {out[tag + '_replayed_records']:.0f} records onto the volume and fdatasync "
              f"{out[tag + '_replay_s']:.2f} s")
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
