"""Fixtures for the real-kernel tests: the cached QEMU guest image and a running usbmirror device.

The device is the project's own local unit, started as a user would start it (through
`host_tests.units`): ``python -m firmware.cli local --volume IMG --size SIZE --usbip 127.0.0.1:PORT
--state-dir DIR``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from host_tests.units import UnitProcess, Units, free_port
from hw.qemu.build_guest import BuildError, GuestBuilder, GuestImage
from hw.qemu.guest import GuestResult, run_guest

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


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    """Unit processes of one test (`host_tests.units`), all stopped at its end."""
    with Units(tmp_path) as u:
        yield u


def run_checked_guest(script: str, port: int, image: GuestImage, units: Units, what: str, *,
                      timeout: float) -> GuestResult:
    """Run `script` in a guest attached to the USB/IP device on `port`; it must exit 0 having marked
    done=1, else the test fails with the guest's output and the units' logs."""
    res = run_guest(script, usbip_port=port, timeout=timeout, image=image)
    assert res.rc == 0 and res.markers.get("done") == "1", f"{what} failed\n{res.describe()}\n{units.describe()}"
    return res


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
    """A local unit serving `image` over USB/IP (no remotes), a `host_tests.units` process underneath."""

    unit: UnitProcess
    image: Path
    busid: str = "1-1"

    @property
    def port(self) -> int:
        return self.unit.port

    @property
    def state(self) -> Path:
        return self.unit.state_dir

    def log(self) -> str:
        return self.unit.log()

    def status(self) -> dict[str, object]:
        """`usbmirror status --json` of the running unit (SCSI and USB counters, journal state)."""
        return self.unit.status()

    def kill(self) -> None:
        """SIGKILL: the process dies with whatever it had not written yet."""
        self.unit.kill9()

    def stop(self) -> int:
        """SIGTERM (clean shutdown: everything flushed to the image), SIGKILL after 20 s."""
        return self.unit.stop(20)


@pytest.fixture
def start_device(tmp_path: Path) -> Iterator[Callable[..., RunningDevice]]:
    """Start a USB/IP device serving an image file of the given size; stopped at teardown."""
    with Units(tmp_path) as units:

        def start(size: int = 64 << 20, *, image: Path | None = None, extra_args: list[str] | None = None,
                  state: Path | None = None) -> RunningDevice:
            """Start a device; pass `image` and `state` of an earlier one to restart that unit."""
            image = image or tmp_path / "disk.img"
            if not image.exists():
                with open(image, "wb") as fh:
                    fh.truncate(size)
            port = free_port()
            if state is None:
                state = tmp_path / f"state-{port}"
                state.mkdir()
            argv = ["local", "--volume", str(image), "--size", f"{size // (1 << 20)}M", "--usbip",
                    f"127.0.0.1:{port}", "--state-dir", str(state), *(extra_args or [])]
            return RunningDevice(units.start_argv("local", argv, state, port), image)

        yield start
