"""What `--metrics` costs the local unit per SCSI command.

The same `usbmirror local` workloads as bench/bench_unit_cpu.py (4 KiB random writes, 120 KiB
sequential writes and reads over USB/IP on loopback, write cache off, journal on), once without
`--metrics` and once with it while this process scrapes `/metrics` every second (as Prometheus
would, more often than its usual 15 s). Prints the unit's CPU per command both ways and their
ratio (target <= 1.05), and the scrape's own time. The figure without metrics is the raw limit.

CPU time comes in clock ticks: the resolution is 10 ms / --ops per command.

Run: .venv/bin/python bench/bench_metrics.py [--ops 2000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_unit_cpu import drive
from host_tests.units import Units, free_port
from host_tests.usbip_support import UsbipClient

SPAN = 64 << 20


def one_run(work: Path, ops: int, metrics: bool) -> tuple[dict[str, tuple[float, float]], list[float]]:
    scrape_s: list[float] = []
    with Units(work) as units:
        addr = f"127.0.0.1:{free_port()}"
        u = units.start_local(volume=work / "volume.img", size="64M", journal_size="256M",
                              extra=["--metrics", addr] if metrics else [])
        done = threading.Event()

        def scraper() -> None:
            while not done.wait(1.0):
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
                    r.read()
                scrape_s.append(time.perf_counter() - t0)

        th = threading.Thread(target=scraper, name="scraper", daemon=True)
        if metrics:
            th.start()
        try:
            with UsbipClient("127.0.0.1", u.port) as client:
                if client.import_device("1-1").status != 0:
                    raise SystemExit("import refused")
                client.enumerate()
                client.scsi(bytes(6))  # TEST UNIT READY: clears the power-on unit attention
                out = drive(client, u.pid, ops, SPAN)
        finally:
            done.set()
            if metrics:
                th.join(timeout=15)
    return out, scrape_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=2000, help="commands per workload")
    ap.add_argument("--dir", default=None, help="directory for the images and journal (default: a temp dir)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-", dir=args.dir) as tmp:
        plain, _ = one_run(Path(tmp) / "plain", args.ops, metrics=False)
        with_m, scrapes = one_run(Path(tmp) / "metrics", args.ops, metrics=True)
    print(f"bench_metrics: `usbmirror local` over USB/IP, {args.ops} commands per workload, "
          f"with --metrics scraped every 1 s ({len(scrapes)} scrapes)")
    print(f"{'workload':28} {'CPU/cmd plain':>14} {'with metrics':>13} {'ratio':>6} {'target':>7}")
    labels = {"rand_write": "4 KiB random write", "seq_write": "120 KiB sequential write",
              "seq_read": "120 KiB sequential read"}
    for key, label in labels.items():
        a, b = plain[key][0], with_m[key][0]
        ratio = b / a if a else float("nan")
        print(f"{label:28} {a:11.1f} µs {b:10.1f} µs {ratio:6.2f} {'<=1.05':>7}")
    if scrapes:
        print(f"scrape time: median {sorted(scrapes)[len(scrapes) // 2] * 1e3:.1f} ms, "
              f"max {max(scrapes) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
