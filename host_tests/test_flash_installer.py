"""`make flash TARGET=<dir>` into a directory laid out like a Debian / Raspberry Pi OS root: the right
files land, the units pass `systemd-analyze verify`, a second run changes nothing, operator edits
survive, and a profile that does not fit the target is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEMD_UNITS = Path("/usr/lib/systemd/system")


def debian_root(tmp: Path, *, os_id: str = "raspbian", pi_boot: bool = True, model: str | None = None) -> Path:
    root = tmp / "root"
    for d in ("etc", "usr/bin", "usr/lib", "var/lib", "opt", "proc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "bin").symlink_to("usr/bin")
    like = "" if os_id == "debian" else "ID_LIKE=debian\n"
    if os_id == "fedora":
        like = "ID_LIKE=\"rhel centos\"\n"
    (root / "etc/os-release").write_text(f'PRETTY_NAME="{os_id} 12"\nID={os_id}\n{like}')
    if pi_boot:
        boot = root / "boot/firmware"
        boot.mkdir(parents=True)
        (boot / "config.txt").write_text("[pi4]\narm_boost=1\n[all]\narm_64bit=1\n")
        (boot / "cmdline.txt").write_text("console=serial0,115200 root=PARTUUID=abcd-02 rootfstype=ext4 "
                                          "modules-load=i2c-dev fsck.repair=yes rootwait\n")
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    return root


def flash(board: str, target: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["make", "-s", "-C", str(REPO), "flash", f"BOARD={board}", f"TARGET={target}"]
    if extra:
        args.append("FLASH_ARGS=" + " ".join(extra))
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def snapshot(root: Path) -> dict[str, tuple[bytes | str, int, int]]:
    out: dict[str, tuple[bytes | str, int, int]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = (os.readlink(p), st.st_mode, 0)
        elif p.is_file():
            out[str(p.relative_to(root))] = (p.read_bytes(), st.st_mode, st.st_mtime_ns)
    return out


def test_rpi4_into_a_mounted_root_lands_everything_and_is_idempotent(tmp_path: Path) -> None:
    root = debian_root(tmp_path, model="Raspberry Pi 4 Model B Rev 1.4")
    first = flash("rpi4", root)
    assert first.returncode == 0, first.stderr
    assert "created   /etc/systemd/system/usbmirror-local.service" in first.stdout
    assert "updated   /boot/firmware/config.txt" in first.stdout

    src = root / "opt/usbmirror/src"
    assert (src / "firmware/cli.py").read_bytes() == (REPO / "firmware/cli.py").read_bytes()
    assert (src / "gadget/functionfs.py").is_file() and (src / "pyproject.toml").is_file()
    assert os.access(root / "opt/usbmirror/install-venv.sh", os.X_OK)
    unit = root / "etc/systemd/system/usbmirror-local.service"
    assert unit.read_bytes() == (REPO / "hw/systemd/usbmirror-local.service").read_bytes()
    wants = root / "etc/systemd/system/multi-user.target.wants/usbmirror-local.service"
    assert os.readlink(wants) == "/etc/systemd/system/usbmirror-local.service"
    assert not (root / "etc/systemd/system/usbmirror-remote.service").exists()

    cfg = tomllib.loads((root / "etc/usbmirror/local.toml").read_text())
    assert cfg["gadget"] == "fe980000.usb" and cfg["acm-console"] == "on"
    from firmware.config import LOCAL_OPTS

    known = {o.key for o in LOCAL_OPTS}
    assert {k.replace("-", "_") for k in cfg} <= known  # the template is a config the CLI accepts
    assert (root / "etc/usbmirror/local.toml").stat().st_mode & 0o777 == 0o600
    assert "dwc2\nlibcomposite" in (root / "etc/modules-load.d/usbmirror.conf").read_text()
    assert "Storage=persistent" in (root / "etc/systemd/journald.conf.d/usbmirror.conf").read_text()

    config_txt = (root / "boot/firmware/config.txt").read_text()
    assert config_txt.startswith("[pi4]\narm_boost=1\n[all]\narm_64bit=1\n")  # the owner's lines stay
    assert "[all]\ndtoverlay=dwc2,dr_mode=peripheral\n# usbmirror: end" in config_txt
    cmdline = (root / "boot/firmware/cmdline.txt").read_text()
    assert cmdline.count("\n") == 1 and "root=PARTUUID=abcd-02" in cmdline and "rootwait" in cmdline
    assert "modules-load=i2c-dev,dwc2,libcomposite" in cmdline

    # Second run: nothing changes, not even an mtime.
    before = snapshot(root)
    second = flash("rpi4", root)
    assert second.returncode == 0, second.stderr
    assert ": 0 changed," in second.stdout
    assert "created" not in second.stdout and "updated" not in second.stdout
    assert snapshot(root) == before

    # The operator's configuration is never overwritten; a changed source file is updated.
    (root / "etc/usbmirror/local.toml").write_text('volume = "/dev/sda"\n')
    (src / "firmware/cli.py").write_text("# damaged\n")
    third = flash("rpi4", root)
    assert third.returncode == 0
    assert (root / "etc/usbmirror/local.toml").read_text() == 'volume = "/dev/sda"\n'
    assert "updated   /opt/usbmirror/src/firmware/cli.py" in third.stdout
    assert (src / "firmware/cli.py").read_bytes() == (REPO / "firmware/cli.py").read_bytes()


def _verify(root: Path, units: list[str]) -> subprocess.CompletedProcess[str]:
    # systemd-analyze resolves dependencies and ExecStart inside --root: give the fake root the
    # distribution's units, /bin/sh, and the venv entry point usbmirror-install.service creates.
    shutil.copytree(SYSTEMD_UNITS, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    shutil.copy2("/bin/sh", root / "usr/bin/sh")
    entry = root / "opt/usbmirror/venv/bin/usbmirror"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    return subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                           *[f"/etc/systemd/system/{u}" for u in units]],
                          capture_output=True, text=True, timeout=60, check=False)


def _need_systemd() -> None:
    if shutil.which("systemd-analyze") is None or not SYSTEMD_UNITS.is_dir():
        pytest.skip("systemd-analyze not installed (apt-get install -y systemd): units not verified")


@pytest.mark.parametrize(("board", "units"), [
    ("rpi-zero2w", ["usbmirror-local.service", "usbmirror-install.service"]),
    ("remote", ["usbmirror-remote.service", "usbmirror-install.service"]),
])
def test_installed_units_pass_systemd_analyze_verify(tmp_path: Path, board: str, units: list[str]) -> None:
    _need_systemd()
    root = debian_root(tmp_path, os_id="debian", pi_boot=board != "remote")
    res = flash(board, root)
    assert res.returncode == 0, res.stderr
    out = _verify(root, units)
    assert out.returncode == 0, out.stderr
    # verify only warns (exit 0) on unknown keys or bad values: any line naming our units is a defect
    complaints = [ln for ln in (out.stdout + out.stderr).splitlines() if "usbmirror" in ln]
    assert complaints == []


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit with a bad value is reported."""
    _need_systemd()
    root = debian_root(tmp_path, os_id="debian", pi_boot=False)
    assert flash("remote", root).returncode == 0
    unit = root / "etc/systemd/system/usbmirror-remote.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=sometimes"))
    out = _verify(root, ["usbmirror-remote.service"])
    assert "usbmirror-remote.service" in out.stdout + out.stderr


def test_remote_profile_installs_the_remote_unit_and_template(tmp_path: Path) -> None:
    root = debian_root(tmp_path, os_id="debian", pi_boot=False)
    res = flash("remote", root)
    assert res.returncode == 0, res.stderr
    assert (root / "etc/systemd/system/usbmirror-remote.service").is_file()
    assert not (root / "etc/systemd/system/usbmirror-local.service").exists()
    cfg = tomllib.loads((root / "etc/usbmirror/remote.toml").read_text())
    assert cfg["listen"] == "0.0.0.0:7373" and "targets" in cfg
    assert not (root / "etc/modules-load.d/usbmirror.conf").exists()


def test_rk3588_leaves_boot_files_alone_and_prints_the_manual_steps(tmp_path: Path) -> None:
    root = debian_root(tmp_path, os_id="debian", pi_boot=False, model="Radxa ROCK 5B")
    res = flash("rk3588", root)
    assert res.returncode == 0, res.stderr
    assert "manual step for rk3588" in res.stdout and "peripheral" in res.stdout
    assert (root / "etc/usbmirror/local.toml").read_text().count('gadget = "fc000000.usb"') == 1


@pytest.mark.parametrize(("board", "kw", "reason"), [
    ("rpi4", {"model": "Raspberry Pi Zero 2 W Rev 1.0"}, "profile rpi4 is for"),
    ("rpi4", {"os_id": "fedora"}, "supports debian"),
    ("rpi-zero2w", {"pi_boot": False}, "not a Raspberry Pi boot layout"),
    ("rk3588", {"model": "Raspberry Pi 4 Model B"}, "profile rk3588 is for"),
])
def test_a_profile_that_does_not_fit_is_refused(tmp_path: Path, board: str, kw: dict[str, object],
                                                reason: str) -> None:
    root = debian_root(tmp_path, **kw)  # type: ignore[arg-type]
    before = snapshot(root)
    res = flash(board, root)
    assert res.returncode != 0
    assert "refusing profile" in res.stderr and reason in res.stderr
    assert snapshot(root) == before  # nothing written
    forced = flash(board, root, "--force") if kw.get("pi_boot", True) else None
    if forced is not None:
        assert forced.returncode == 0, forced.stderr


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = debian_root(tmp_path)
    before = snapshot(root)
    res = flash("rpi4", root, "--dry-run")
    assert res.returncode == 0
    assert "would be created" in res.stdout
    assert snapshot(root) == before


def test_unknown_board_lists_the_profiles(tmp_path: Path) -> None:
    res = flash("pdp11", debian_root(tmp_path))
    assert res.returncode != 0
    assert "rpi4" in res.stderr and "rk3588" in res.stderr


FAKE_SSH = r"""#!/bin/sh
# Stands in for `ssh -o BatchMode=yes DEST COMMAND`: runs COMMAND with /bin/sh in a chroot of the
# board's root, this machine's /usr bound read-only into it for the tools.
root=$1; shift
while [ $# -gt 0 ]; do case "$1" in -o) shift 2;; *) break;; esac; done
shift  # DEST
exec unshare -m sh -c 'mount --bind /usr "$0/usr" && mount -o remount,bind,ro "$0/usr" \
    && exec chroot "$0" /bin/sh -c "$1"' "$root" "$*"
"""


def ssh_root(tmp: Path, *, model: str | None = None) -> tuple[Path, Path]:
    root = tmp / "board"
    (root / "usr").mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        (root / link).symlink_to(f"usr/{link}")
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12\"\n")
    boot = root / "boot/firmware"
    boot.mkdir(parents=True)
    (boot / "config.txt").write_text("arm_64bit=1\n")
    (boot / "cmdline.txt").write_text("console=tty1 root=/dev/mmcblk0p2 rootwait\n")
    if model:
        (root / "proc/device-tree").mkdir(parents=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    fake = tmp / "fake-ssh"
    fake.write_text(FAKE_SSH)
    fake.chmod(0o755)
    probe = subprocess.run([str(fake), str(root), "-o", "BatchMode=yes", "root@board", "cat /etc/os-release"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot chroot with a private mount namespace here ({probe.stderr.strip()}): "
                    "the SSH path is untested")
    return root, fake


def flash_ssh(board: str, root: Path, fake: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "hw/flash/flash.py"), "--board", board, "--target",
                           "root@board", "--ssh", f"{fake} {root}", "--no-venv", *extra],
                          capture_output=True, text=True, timeout=300, check=False)


def test_flash_over_ssh_lands_the_same_files_and_is_idempotent(tmp_path: Path) -> None:
    root, fake = ssh_root(tmp_path, model="Raspberry Pi 4 Model B Rev 1.5")
    first = flash_ssh("rpi4", root, fake)
    assert first.returncode == 0, first.stderr
    assert (root / "opt/usbmirror/src/gadget/functionfs.py").read_bytes() == \
        (REPO / "gadget/functionfs.py").read_bytes()
    assert os.access(root / "opt/usbmirror/install-venv.sh", os.X_OK)
    assert os.readlink(root / "etc/systemd/system/multi-user.target.wants/usbmirror-local.service") == \
        "/etc/systemd/system/usbmirror-local.service"
    assert (root / "etc/usbmirror/local.toml").stat().st_mode & 0o777 == 0o600
    assert "modules-load=dwc2,libcomposite" in (root / "boot/firmware/cmdline.txt").read_text()
    second = flash_ssh("rpi4", root, fake)
    assert second.returncode == 0, second.stderr
    assert ": 0 changed," in second.stdout, second.stdout


def test_flash_over_ssh_refuses_the_wrong_board(tmp_path: Path) -> None:
    root, fake = ssh_root(tmp_path, model="Radxa ROCK 5B")
    res = flash_ssh("rpi-zero2w", root, fake)
    assert res.returncode == 2 and "refusing profile" in res.stderr and "Radxa ROCK 5B" in res.stderr
    assert not (root / "opt").exists()


@pytest.mark.parametrize("unit", ["usbmirror-local.service", "usbmirror-remote.service"])
def test_units_never_restrict_device_access(unit: str) -> None:
    """The local unit opens the volume's block device and /dev/ttyGS0, the remote its target drives:
    anything that turns on systemd's device allowlist (DeviceAllow, PrivateDevices, ProtectClock, which
    implies DeviceAllow=char-rtc) would make them fail on a board while passing every check here."""
    text = (REPO / "hw/systemd" / unit).read_text()
    settings = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line and not line.startswith("#")}
    assert not settings & {"DeviceAllow", "PrivateDevices", "ProtectClock", "DevicePolicy"}
    assert {"ProtectSystem", "PrivateTmp", "NoNewPrivileges", "Restart"} <= settings
