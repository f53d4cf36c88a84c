"""Cascade: how far the last hop (r2) trails when the relay (r1) runs at full rate.

One source in this process (a real `LocalUnit`: ring journal and volume on files, write cache on)
replicates to a `usbmirror remote` process r1 that relays it (`--forward`) to a second remote process
r2. After a warm-up that brings both copies up to date, the source writes as fast as it can (random
64 KiB writes, a flush every 4 MiB). Printed per round: r1's apply rate and r2's apply rate (payload
bytes from the first write until each has the last record durable) and their ratio, measured in the
same run; r2's lag behind r1 as r1's status shows it (`forward.lag_bytes`, `forward.lag_seconds`:
the age of the oldest record r2 lacks), sampled every 0.1 s, as the mean and the peak; and how long r2
needed after r1 was done. The best round (by the ratio) is printed last.

All three units share this machine's CPU (r1 receives, journals and sends, r2 receives), so the
figures are a floor for a relay with a core of its own.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware import control
from firmware.journal import Journal
from firmware.local_unit import LocalUnit
from firmware.pairing import TlsFiles, pair
from firmware.replication.spec import RemoteSpec
from firmware.replicator import Replicator, ReplicatorTuning
from firmware.volume import Volume
from host_tests.units import Units, free_port

MIB = 1 << 20
BS = 4096
SID = "cascade"
TUNING = ReplicatorTuning(heartbeat_interval_s=2.0, dead_after_s=60.0, backoff_initial_s=0.2, backoff_max_s=1.0)


def source_status(st: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = st["sources"][0]
    return out


def status(unit: Any) -> dict[str, Any]:
    """The unit's status straight from its control socket (no `usbmirror status` process per sample)."""
    return control.request(unit.state_dir, {"cmd": "status"})


class Sampler(threading.Thread):
    """Polls r1's status (its forward lag) every `interval` s while the round runs."""

    def __init__(self, r1: Any, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.r1, self.interval = r1, interval
        self.stop = threading.Event()
        self.samples: list[tuple[int, float]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                fwd = source_status(status(self.r1))["forward"]
                self.samples.append((int(fwd["lag_bytes"] or 0), float(fwd["lag_seconds"] or 0.0)))
            except Exception:
                pass
            self.stop.wait(self.interval)


def wait(pred: Any, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.perf_counter()


def round_(units: Units, r1: Any, r2: Any, unit: LocalUnit, journal: Journal, rep: Replicator, total: int,
           rng: random.Random, vol_blocks: int) -> dict[str, float]:
    base1 = int(source_status(status(r1))["bytes_applied"])
    base2 = int(source_status(status(r2))["bytes_applied"])
    sampler = Sampler(r1)
    sampler.start()
    t0 = time.perf_counter()
    written = 0
    per = 64 << 10
    while written < total:
        lba = rng.randrange(0, vol_blocks - per // BS)
        unit.write(lba, rng.randbytes(per))
        written += per
        if written % (4 * MIB) == 0:
            unit.flush()
    unit.flush()
    head = journal.durable_seq
    t_local = time.perf_counter()
    t1 = wait(lambda: rep.links[0].acked_seq >= head, 600, "r1 to acknowledge the round")

    def r2_done() -> bool:
        fwd = source_status(status(r1))["forward"]
        return bool(fwd["lag_records"] == 0 and fwd["acked_seq"] == fwd["journal_head_seq"])

    t2 = wait(r2_done, 600, "r2 to acknowledge the round")
    sampler.stop.set()
    sampler.join()
    got1 = int(source_status(status(r1))["bytes_applied"]) - base1
    got2 = int(source_status(status(r2))["bytes_applied"]) - base2
    lags = sampler.samples or [(0, 0.0)]
    return {"written": written, "local_s": t_local - t0, "r1_s": t1 - t0, "r2_s": t2 - t0,
            "r1_rate": got1 / (t1 - t0), "r2_rate": got2 / (t2 - t0), "after_r1_s": max(0.0, t2 - t1),
            "lag_bytes_mean": sum(b for b, _ in lags) / len(lags), "lag_bytes_peak": max(b for b, _ in lags),
            "lag_s_mean": sum(s for _, s in lags) / len(lags), "lag_s_peak": max(s for _, s in lags)}


def run(work: Path, mib: int, rounds: int) -> None:
    tls = work / "tls"
    pair(tls, ["r1", "r2"], [SID])
    size = max(256 * MIB, 2 * mib * MIB)
    with Units(work) as units:
        r2_port = free_port()
        r1 = units.start_remote("r1", targets={SID: work / "r1.img"}, tls_dir=tls,
                                extra=["--forward", f"{SID}=127.0.0.1:{r2_port}", "--forward-retention",
                                       f"{max(256, 2 * mib)}M"])
        r2 = units.start_remote("r2", targets={SID: work / "r2.img"}, tls_dir=tls, port=r2_port)
        volume = Volume(work / "volume.img", size=size, block_size=BS, write_cache=True)
        journal = Journal.open(work / "journal", size=max(256, 2 * mib) * MIB, unit_uuid=uuid.uuid4(), block_size=BS)
        unit = LocalUnit(volume, journal, bitmap_path=str(work / "dirty.bitmap"), write_cache=True)
        rep = Replicator(unit, journal, source_id=SID, remotes=[RemoteSpec(r1.address, "async", "r1")],
                         tls=TlsFiles.for_source(tls, SID), tuning=TUNING)
        rep.start()
        try:
            rng = random.Random(7)
            wait(lambda: rep.links[0].state.name == "STREAMING", 300, "the link to r1")
            unit.write(0, rng.randbytes(BS))
            unit.flush()
            r1.wait_status(lambda st: source_status(st)["forward"]["state"] == "streaming"
                           and source_status(st)["forward"]["lag_records"] == 0
                           and source_status(st)["forward"]["dirty_regions"] == 0, timeout=300,
                           what="the warm-up to reach r2")
            results = []
            for i in range(rounds):
                r = round_(units, r1, r2, unit, journal, rep, mib * MIB, rng, volume.num_blocks)
                results.append(r)
                print(f"round {i + 1}: {r['written'] / MIB:.0f} MiB written in {r['local_s']:.2f} s; "
                      f"r1 applied at {r['r1_rate'] / MIB:.1f} MiB/s, r2 at {r['r2_rate'] / MIB:.1f} MiB/s, "
                      f"ratio r2/r1 {r['r2_rate'] / r['r1_rate']:.2f}; r2 lag behind r1: mean "
                      f"{r['lag_bytes_mean'] / MIB:.1f} MiB / {r['lag_s_mean']:.2f} s, peak "
                      f"{r['lag_bytes_peak'] / MIB:.1f} MiB / {r['lag_s_peak']:.2f} s; r2 done "
                      f"{r['after_r1_s']:.2f} s after r1", flush=True)
            best = max(results, key=lambda r: r["r2_rate"] / r["r1_rate"])
            print(f"cascade (best of {rounds}): r1 {best['r1_rate'] / MIB:.1f} MiB/s, r2 {best['r2_rate'] / MIB:.1f} "
                  f"MiB/s, ratio {best['r2_rate'] / best['r1_rate']:.2f}; r2 lag mean "
                  f"{best['lag_bytes_mean'] / MIB:.1f} MiB, {best['lag_s_mean']:.2f} s; peak "
                  f"{best['lag_bytes_peak'] / MIB:.1f} MiB, {best['lag_s_peak']:.2f} s", flush=True)
            print(json.dumps({"bench": "cascade", **{k: round(v, 3) for k, v in best.items()}}), flush=True)
        finally:
            rep.close()
            unit.close()
            journal.close()
            volume.close()
            r1.stop()
            r2.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB written per round (default 64)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cascade-") as tmp:
        run(Path(tmp), args.mib, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
