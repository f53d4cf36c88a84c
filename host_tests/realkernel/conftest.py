"""Fixtures for the real-kernel tests: the cached QEMU guest image and a running usbmirror device.

The device is the project's own local unit, started as a user would start it:
``python -m firmware.cli local --volume IMG --size SIZE --usbip 127.0.0.1:PORT --state-dir DIR``.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from hw.qemu.build_guest import BuildError, GuestBuilder, GuestImage

REPO = Path(__file__).resolve().parents[2]

# GPT partition type GUIDs the guests write with sfdisk
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"


def write_gpt(parts: Sequence[tuple[str, int, int, str]], die: str = "die") -> str:
    """Guest shell lines: write a GPT holding `parts` ((name, first LBA, blocks, type GUID), ...) to
    /dev/$d with sfdisk and wait until the kernel shows the last partition; `die` names the script's
    failure function."""
    lines = "\n".join(f'start={start}, size={size}, type={uuid}, name="{name}"' for name, start, size, uuid in parts)
    last = f"/dev/${{d}}{len(parts)}"
    return f"""sfdisk --wipe always /dev/$d <<'EOF' || {die} sfdisk
label: gpt
{lines}
EOF
n=0; while [ ! -b {last} ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
[ -b {last} ] || {die} partitions_not_seen"""


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: apt-get install -y qemu-system-x86 (make setup does it)")
    try:
        return GuestBuilder().build()
    except BuildError as exc:
        pytest.fail(f"guest image could not be built: {exc}")


@dataclass
class RunningDevice:
    port: int
    image: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    state: Path
    busid: str = "1-1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def status(self) -> dict[str, object]:
        """`usbmirror status --json` of the running unit (SCSI and USB counters, journal state)."""
        proc = subprocess.run([sys.executable, "-m", "firmware.cli", "status", "--json", "--state-dir",
                               str(self.state)], cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, f"usbmirror status failed: {proc.stderr}"
        result: dict[str, object] = json.loads(proc.stdout)
        return result

    def kill(self) -> None:
        """SIGKILL: the process dies with whatever it had not written yet."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM (clean shutdown: everything flushed to the image), SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"device exited with rc={proc.returncode} before listening:\n"
                                 f"{log_path.read_text(errors='replace')[-4000:]}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"device not listening on 127.0.0.1:{port} after {timeout}s:\n"
                         f"{log_path.read_text(errors='replace')[-4000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def start_device(tmp_path: Path) -> Iterator[Callable[..., RunningDevice]]:
    """Start a USB/IP device serving an image file of the given size; stopped at teardown."""
    started: list[RunningDevice] = []

    def start(size: int = 64 << 20, *, image: Path | None = None, extra_args: list[str] | None = None,
              state: Path | None = None) -> RunningDevice:
        """Start a device; pass `image` and `state` of an earlier one to restart that unit."""
        image = image or tmp_path / "disk.img"
        if not image.exists():
            with open(image, "wb") as fh:
                fh.truncate(size)
        port = _free_port()
        log_path = tmp_path / f"device-{port}.log"
        if state is None:
            state = tmp_path / f"state-{port}"
            state.mkdir()
        cmd = [sys.executable, "-m", "firmware.cli", "local", "--volume", str(image),
               "--size", f"{size // (1 << 20)}M", "--usbip", f"127.0.0.1:{port}", "--state-dir", str(state),
               *(extra_args or [])]
        with open(log_path, "wb") as log_fh:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        dev = RunningDevice(port, image, proc, log_path, state)
        started.append(dev)
        _wait_listening(port, proc, log_path)
        dev.status()  # the control socket answers: start-up is over
        return dev

    yield start
    for dev in started:
        dev.stop()
