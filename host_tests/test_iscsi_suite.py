"""libiscsi's compliance suite (`iscsi-test-cu`, destructive tests allowed) against `usbmirror local
--iscsi` (the local unit, its journal and the SCSI target the USB transports use) and against Debian's
`tgt` on a file-backed LUN, in the same run; both counts are printed.

Every case must pass (or be listed in KNOWN_GAPS with the reason), and the suite must skip fewer checks
("[SKIPPED]" lines: commands the suite found unimplemented, options not set) against our target than
against tgt's in the same run; both counts are printed.

The two runs go side by side (tgt's in a thread): most of each is the suite's own sleeps and timeouts
(3 s after each reset, 3 s waiting for the answer a command outside the CmdSN window must not get).
The unit's volume and journal live in memory (/dev/shm) when the machine has it: the suite runs its
commands one at a time, so on a disk its time would be mostly fdatasync latency, which says nothing
about compliance; the unit's write path (journal record, sync, apply, answer) is the same.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from host_tests.units import Units, free_port, usbmirror

pytestmark = pytest.mark.slow

# suite.case -> why it fails today (none at the moment; a case listed here must say why)
KNOWN_GAPS: dict[str, str] = {}


def _summary(text: str) -> tuple[int, int, int]:
    m = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text)
    assert m, f"no run summary in the suite's output:\n{text[-3000:]}"
    return int(m.group(2)), int(m.group(3)), int(m.group(4))


def _failed_cases(text: str) -> list[str]:
    """suite.case of every failed case, once per run of it (ALL runs some suites more than once). A case
    fails when its result is FAILED; "[FAILED] ..." lines are log lines (also printed when a command
    fails as the case expects)."""
    suite, case, failed = "", "", []
    for line in text.splitlines():
        if m := re.match(r"\s*Suite: (\S+)", line):
            suite = m.group(1)
        if m := re.search(r"Test: (\S+)", line):
            case = m.group(1)
        if line.strip() == "FAILED" or line.rstrip().endswith("...FAILED"):
            failed.append(f"{suite}.{case}")
    return failed


def _run_suite(url: str, timeout: float) -> str:
    done = subprocess.run(["iscsi-test-cu", "-d", url], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return done.stdout + done.stderr


def _memory_dir() -> str | None:
    """A directory in memory for the unit's volume and journal, if the machine has one."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def test_libiscsi_suite_against_our_target_and_tgt(tmp_path: Path) -> None:
    if shutil.which("iscsi-test-cu") is None:
        pytest.fail("iscsi-test-cu missing: `make setup` installs Debian's libiscsi-bin")
    if shutil.which("tgtd") is None:
        pytest.fail("tgtd missing: `make setup` installs Debian's tgt")
    port = free_port()
    with (tempfile.TemporaryDirectory(prefix="usbmirror-suite-", dir=_memory_dir()) as files,
          Units(tmp_path) as units, ThreadPoolExecutor(1) as pool):
        tgt = pool.submit(_tgt_counts, tmp_path)
        state = tmp_path / "state"
        argv = ["local", "--volume", f"{files}/vol.img", "--size", "64M", "--iscsi", f"127.0.0.1:{port}",
                "--state-dir", str(state), "--journal", f"{files}/journal", "--journal-size", "64M"]
        unit = units.start_argv("local", argv, state, port)
        st = unit.status()
        iqn = st["iscsi"]["target"]
        t0 = time.monotonic()
        ours = _run_suite(f"iscsi://127.0.0.1:{port}/{iqn}/0", 400)
        ours_s = time.monotonic() - t0
        assert unit.running(), units.describe()
        assert usbmirror("status", "--state-dir", str(state)).returncode == 0
        tgt_line, tgt_skips = tgt.result()
        units.close()  # the unit stops before its files go
    ran, passed, failed = _summary(ours)
    ours_skips = ours.count("[SKIPPED]")
    print(f"usbmirror: {ran} cases, {passed} passed, {failed} failed, {ours_skips} skipped checks, {ours_s:.0f} s")
    print(tgt_line)
    print(f"skipped checks: usbmirror {ours_skips}, tgt {tgt_skips}")
    cases = _failed_cases(ours)
    print("usbmirror failing cases:", sorted(set(cases)))
    assert len(cases) == failed, f"parsed {cases} but the summary counts {failed} failed cases"
    unexpected = set(cases) - set(KNOWN_GAPS)
    assert not unexpected, f"cases failing beyond the known gaps: {sorted(unexpected)}"
    assert ours_skips < tgt_skips, f"the suite skips {ours_skips} checks against usbmirror, {tgt_skips} against tgt"


def _tgt_counts(tmp_path: Path) -> tuple[str, int]:
    """tgt's summary line and its number of "[SKIPPED]" lines (the reference the test compares with)."""
    lun = tmp_path / "tgt.img"
    lun.write_bytes(b"")
    subprocess.run(["truncate", "-s", "64M", str(lun)], check=True)
    port, ctl = free_port(), 100 + free_port() % 8000  # the control port names a local socket: small numbers
    tgtd = subprocess.Popen(["tgtd", "-f", "--control-port", str(ctl), "--iscsi", f"portal=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        iqn = "iqn.2026-01.net.usbmirror:tgt-reference"
        for args in (["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn],
                     ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(lun)],
                     ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]):
            for _ in range(50):
                r = subprocess.run(["tgtadm", "-C", str(ctl), "--lld", "iscsi", *args], capture_output=True, text=True)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"tgt could not be configured here: {r.stderr.strip()}")
        t0 = time.monotonic()
        out = _run_suite(f"iscsi://127.0.0.1:{port}/{iqn}/1", 400)
        ran, passed, failed = _summary(out)
        skips = out.count("[SKIPPED]")
        return (f"tgt: {ran} cases, {passed} passed, {failed} failed, {skips} skipped checks, "
                f"{time.monotonic() - t0:.0f} s"), skips
    finally:
        # tgtd ignores SIGTERM while it serves targets: the target is removed and tgtd told to shut
        # down (it refuses that while a target exists), then killed if it is still there
        for args in (["--op", "delete", "--force", "--mode", "target", "--tid", "1"],
                     ["--op", "delete", "--mode", "system"]):
            subprocess.run(["tgtadm", "-C", str(ctl), "--lld", "iscsi", *args], capture_output=True)
        try:
            tgtd.wait(timeout=5)
        except subprocess.TimeoutExpired:
            tgtd.kill()
            tgtd.wait(timeout=30)
