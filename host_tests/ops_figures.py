"""The operator figures quoted in docs/OPERATIONS.md, measured on real unit processes on this machine.

1. `curl` of a local unit's `/metrics` while a host writes to it with a remote attached: a real
   `usbmirror local` / `usbmirror remote` pair (TLS from `usbmirror pair`, `--metrics` on both),
   random WRITE(10)s over USB/IP from a thread, `curl -s http://HOST:PORT/metrics` run during the
   load; the lines named on the command line (by prefix) are printed.
2. The watchdog restart time, as systemd plays it with `WatchdogSec=` (the supervisor is this
   script, as in `host_tests/test_metrics_watchdog.py`): a local unit under a stand-in
   NOTIFY_SOCKET with WATCHDOG_USEC set is frozen (SIGSTOP); once a watchdog period passes without
   `WATCHDOG=1` it is killed and started again; printed are the time from the freeze to the
   missed ping, from the kill to READY=1 again, and from the freeze to READY=1, best and median
   of the rounds.

Run: .venv/bin/python -m host_tests.ops_figures [--rounds N] [--watchdog-s S]
Nothing here is used by the firmware or by the tests.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from host_tests.test_cli_units import attach, write_random
from host_tests.units import Units, free_port, streaming

SHOW = ("usbmirror_up", "usbmirror_remote_lag_bytes", "usbmirror_remote_lag_records", "usbmirror_remote_lag_seconds",
        "usbmirror_remote_link_state{remote=\"dr1\",state=\"streaming\"}", "usbmirror_remote_throughput",
        "usbmirror_journal_used_bytes", "usbmirror_journal_capacity_bytes", "usbmirror_overflow ",
        "usbmirror_scsi_commands_total{opcode=\"WRITE_10\"}",
        "usbmirror_scsi_command_duration_seconds_bucket{le=\"0.001\",opcode=\"WRITE_10\"}",
        "usbmirror_scsi_command_duration_seconds_bucket{le=\"0.01\",opcode=\"WRITE_10\"}",
        "usbmirror_scsi_command_duration_seconds_count{opcode=\"WRITE_10\"}")


def metrics_under_load(work: Path) -> list[str]:
    with Units(work) as units:
        tls = units.pair("dr1", ["server1"])
        lmetrics = f"127.0.0.1:{free_port()}"
        remote = units.start_remote("dr1", targets={"server1": work / "target.img"}, tls_dir=tls,
                                    extra=["--metrics", f"127.0.0.1:{free_port()}"])
        local = units.start_local(volume=work / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                                  remotes=[remote.address], extra=["--metrics", lmetrics])
        local.wait_status(streaming(), what="the link to the remote")
        done = threading.Event()

        def load() -> None:
            rng = random.Random(1)
            with attach(local) as c:
                while not done.is_set():
                    write_random(c, rng, 20)

        th = threading.Thread(target=load)
        th.start()
        try:
            time.sleep(3.0)
            out = subprocess.run(["curl", "-s", f"http://{lmetrics}/metrics"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
        finally:
            done.set()
            th.join(timeout=60)
        return [f"$ curl -s http://{lmetrics}/metrics    # during random WRITE(10)s of 1-64 blocks, a remote attached"] + \
            [line for line in out.splitlines() if line.startswith(SHOW)]


def watchdog_round(work: Path, watchdog_s: float) -> tuple[float, float, float]:
    path = work / "notify"
    path.unlink(missing_ok=True)
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(path))
    ns.settimeout(0.05)

    def messages() -> list[str]:
        got = []
        while True:
            try:
                got.append(ns.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return got

    def wait(prefix: str, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m.startswith(prefix) for m in messages()):
                return time.monotonic()
        raise TimeoutError(f"no {prefix} within {timeout} s")

    old = {k: os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"] = str(path), str(int(watchdog_s * 1e6))
    try:
        with Units(work / "units") as units:
            local = units.start_local(volume=work / "volume.img", size="16M")
            wait("READY=1")
            wait("WATCHDOG=1")
            local.signal(signal.SIGSTOP)
            frozen = last_ping = time.monotonic()
            while time.monotonic() - last_ping <= watchdog_s:
                if any(m.startswith("WATCHDOG=1") for m in messages()):
                    last_ping = time.monotonic()
            missed = time.monotonic()
            local.kill9()
            killed = time.monotonic()
            local.launch()
            ready = wait("READY=1")
            local.wait_ready()
            local.stop()
            return missed - frozen, ready - killed, ready - frozen
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        ns.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--watchdog-s", type=float, default=2.0, help="WatchdogSec= to play (the units ship 60)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="usbmirror-ops-") as tmp:
        for line in metrics_under_load(Path(tmp) / "metrics"):
            print(line, flush=True)
        rounds = []
        for i in range(args.rounds):
            d = Path(tmp) / f"wd{i}"
            d.mkdir()
            rounds.append(watchdog_round(d, args.watchdog_s))
        for name, k in (("freeze to missed ping", 0), ("kill to READY=1", 1), ("freeze to READY=1", 2)):
            vals = [r[k] for r in rounds]
            print(f"watchdog (WatchdogSec={args.watchdog_s:g}): {name}: best {min(vals):.2f} s, median "
                  f"{statistics.median(vals):.2f} s of {len(vals)} rounds", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
