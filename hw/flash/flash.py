"""`make flash BOARD=<profile> TARGET=<user@host | mounted root>`: install usbmirror onto a board.

Installs, into a running board over SSH or into a mounted SD-card/eMMC root file system:

- the firmware source tree under /opt/usbmirror/src (or the wheels given with --wheels), and
  /opt/usbmirror/install-venv.sh, which builds the venv /opt/usbmirror/venv with the Python
  dependencies (run at once over SSH; on a mounted root, by usbmirror-install.service at first boot);
- the systemd units (usbmirror-install + the role's unit, enabled), the board profile
  (/etc/usbmirror/board.toml), a config template (/etc/usbmirror/<role>.toml, only when absent:
  the operator's edits are never overwritten), modules-load.d and a persistent journald drop-in;
- the profile's boot configuration: for Raspberry Pi a marked block in config.txt
  (`dtoverlay=dwc2,...`) and `modules-load=` merged into cmdline.txt; for boards booting through
  U-Boot/extlinux the manual steps are printed, boot files are not touched.

Idempotent: every file is compared first and only written when its content or mode differs; each
change is printed, and a second run prints nothing but the summary. It refuses a profile that does
not match the target when it can tell (/etc/os-release ID, /proc/device-tree/model, the Pi boot
files), unless --force.

Only the standard library is used, so it runs from a fresh checkout with the system python3.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[2]
BOARDS = REPO / "hw" / "boards"
SYSTEMD = REPO / "hw" / "systemd"
SOURCE_DIRS = ("firmware", "gadget")
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")
DOC_GLOBS = ("docs/*.md", "hw/boards/*.toml", "hw/systemd/*.service")
PREFIX = PurePosixPath("/opt/usbmirror")
BEGIN_MARK = "# usbmirror: begin (managed by make flash; edits inside are replaced)"
END_MARK = "# usbmirror: end"

INSTALL_VENV = r"""#!/bin/sh
# Build /opt/usbmirror/venv for the installed source (or wheels). Written by `make flash`;
# run by usbmirror-install.service at boot and by flash.py over SSH. Does nothing when the venv
# already matches the installed source.
set -eu
P=/opt/usbmirror
want=$(cat "$P/src/SOURCE_HASH")
if [ -x "$P/venv/bin/usbmirror" ] && [ "$(cat "$P/venv/SOURCE_HASH" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
python3 -m venv "$P/venv" || {
    echo "usbmirror: python3 -m venv failed: apt-get install python3-venv libaio1" >&2; exit 1; }
if ls "$P"/wheels/usbmirror-*.whl >/dev/null 2>&1; then
    "$P/venv/bin/pip" install --no-index --find-links "$P/wheels" "usbmirror[board]"
elif ls "$P"/wheels/*.whl >/dev/null 2>&1; then
    "$P/venv/bin/pip" install --no-index --find-links "$P/wheels" "$P/src[board]"
else
    "$P/venv/bin/pip" install "$P/src[board]"
fi
echo "$want" > "$P/venv/SOURCE_HASH"
"""


class FlashError(Exception):
    """The installation cannot go ahead (wrong profile, unreachable target, missing boot files)."""


# -- profiles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoardProfile:
    name: str
    role: str  # "local" or "remote"
    description: str
    model_match: tuple[str, ...]
    os_ids: tuple[str, ...]
    udc: str
    expected_speed: str
    boot_dirs: tuple[str, ...]
    config_txt: tuple[str, ...]
    cmdline_modules: tuple[str, ...]
    modules_load: tuple[str, ...]
    manual_steps: tuple[str, ...]
    journal: str
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def unit(self) -> str:
        return f"usbmirror-{self.role}.service"


def list_profiles() -> list[str]:
    return sorted(p.stem for p in BOARDS.glob("*.toml"))


def load_profile(name: str) -> BoardProfile:
    path = BOARDS / f"{name}.toml"
    if not path.is_file():
        raise FlashError(f"no board profile {name!r}; choose one of: {', '.join(list_profiles())}")
    raw = tomllib.loads(path.read_text())
    b, usb, boot, storage = raw["board"], raw.get("usb", {}), raw.get("boot", {}), raw.get("storage", {})
    role = b["role"]
    if role not in ("local", "remote"):
        raise FlashError(f"{path}: role must be local or remote, not {role!r}")
    return BoardProfile(
        name=b["name"], role=role, description=b["description"],
        model_match=tuple(b.get("model_match", ())), os_ids=tuple(b.get("os_ids", ())),
        udc=usb.get("udc", ""), expected_speed=usb.get("expected_speed", ""),
        boot_dirs=tuple(boot.get("boot_dirs", ())), config_txt=tuple(boot.get("config_txt", ())),
        cmdline_modules=tuple(boot.get("cmdline_modules", ())),
        modules_load=tuple(boot.get("modules_load", ())), manual_steps=tuple(boot.get("manual_steps", ())),
        journal=storage.get("journal", ""), raw=raw,
    )


# -- targets -------------------------------------------------------------------------------------
class Target(Protocol):
    description: str
    live: bool  # a running system (SSH): commands can run, /proc is real

    def read(self, path: str) -> bytes | None: ...
    def mode(self, path: str) -> int | None: ...
    def write(self, path: str, data: bytes, mode: int) -> None: ...
    def readlink(self, path: str) -> str | None: ...
    def symlink(self, path: str, points_to: str) -> None: ...
    def run(self, command: str) -> subprocess.CompletedProcess[str]: ...


def _check_abs(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts:
        raise FlashError(f"refusing path {path!r}")
    return p


class DirTarget:
    """A mounted root file system (e.g. an SD card's root at /mnt/sd, boot partition mounted inside)."""

    live = False

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise FlashError(f"target {root} is not a directory")
        self.root = root
        self.description = f"root file system at {root}"

    def _p(self, path: str) -> Path:
        return self.root / str(_check_abs(path)).lstrip("/")

    def read(self, path: str) -> bytes | None:
        try:
            return self._p(path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def mode(self, path: str) -> int | None:
        try:
            return self._p(path).stat().st_mode & 0o7777
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes, mode: int) -> None:
        p = self._p(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".usbmirror-tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, mode)
        os.replace(tmp, p)

    def readlink(self, path: str) -> str | None:
        try:
            return os.readlink(self._p(path))
        except (FileNotFoundError, OSError):
            return None

    def symlink(self, path: str, points_to: str) -> None:
        p = self._p(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        os.symlink(points_to, p)

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        raise FlashError("cannot run commands in a mounted root")


class SshTarget:
    """A running board reached with `ssh user@host` (key authentication, root or passwordless sudo)."""

    live = True

    def __init__(self, dest: str, *, ssh: str = "ssh") -> None:
        self.dest = dest
        self.description = f"{dest} over SSH"
        self._ssh = [*shlex.split(ssh), "-o", "BatchMode=yes", dest]
        self._sudo = "" if dest.startswith("root@") else "sudo -n "

    def run(self, command: str, data: bytes | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self._ssh, f"{self._sudo}sh -c {shlex.quote(command)}"],
                              input=data.decode("latin-1") if data is not None else None,
                              capture_output=True, text=True, encoding="latin-1", check=False, timeout=600)
        if proc.returncode == 255:
            raise FlashError(f"ssh {self.dest} failed: {proc.stderr.strip()}")
        return proc

    def read(self, path: str) -> bytes | None:
        proc = self.run(f"cat -- {shlex.quote(str(_check_abs(path)))}")
        return proc.stdout.encode("latin-1") if proc.returncode == 0 else None

    def mode(self, path: str) -> int | None:
        proc = self.run(f"stat -c %a -- {shlex.quote(str(_check_abs(path)))}")
        return int(proc.stdout.strip(), 8) if proc.returncode == 0 else None

    def write(self, path: str, data: bytes, mode: int) -> None:
        q = shlex.quote(str(_check_abs(path)))
        proc = self.run(f"mkdir -p \"$(dirname {q})\" && cat > {q}.usbmirror-tmp && chmod {mode:o} "
                        f"{q}.usbmirror-tmp && mv {q}.usbmirror-tmp {q}", data)
        if proc.returncode != 0:
            raise FlashError(f"writing {path} on {self.dest} failed: {proc.stderr.strip()}")

    def readlink(self, path: str) -> str | None:
        proc = self.run(f"readlink -- {shlex.quote(str(_check_abs(path)))}")
        return proc.stdout.strip() if proc.returncode == 0 else None

    def symlink(self, path: str, points_to: str) -> None:
        q = shlex.quote(str(_check_abs(path)))
        proc = self.run(f"mkdir -p \"$(dirname {q})\" && ln -sfn {shlex.quote(points_to)} {q}")
        if proc.returncode != 0:
            raise FlashError(f"linking {path} on {self.dest} failed: {proc.stderr.strip()}")


def open_target(spec: str, *, ssh: str = "ssh") -> Target:
    """A path (existing directory) is a mounted root; `user@host` or `host:` is an SSH target."""
    if "@" in spec or spec.endswith(":"):
        return SshTarget(spec.rstrip(":"), ssh=ssh)
    return DirTarget(Path(spec))


# -- checks --------------------------------------------------------------------------------------
def parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            out[key.strip()] = value.strip().strip("\"'")
    return out


def check_profile(profile: BoardProfile, target: Target) -> list[str]:
    """Reasons the profile does not fit the target (empty: fits, or we cannot tell)."""
    problems: list[str] = []
    raw = target.read("/etc/os-release") or target.read("/usr/lib/os-release")
    if raw is None:
        problems.append("no /etc/os-release: this does not look like a Debian or Raspberry Pi OS root")
    else:
        rel = parse_os_release(raw.decode(errors="replace"))
        ids = {rel.get("ID", "")} | set(rel.get("ID_LIKE", "").split())
        if profile.os_ids and not ids & set(profile.os_ids):
            problems.append(f"target OS is {rel.get('PRETTY_NAME', rel.get('ID', '?'))!r}; profile "
                            f"{profile.name} supports {', '.join(profile.os_ids)}")
    model_raw = target.read("/proc/device-tree/model") or target.read("/sys/firmware/devicetree/base/model")
    if model_raw is not None and profile.model_match:
        model = model_raw.decode(errors="replace").strip("\0\n ")
        if not any(m.lower() in model.lower() for m in profile.model_match):
            problems.append(f"target board is {model!r}; profile {profile.name} is for "
                            f"{' / '.join(profile.model_match)}")
    if profile.config_txt and find_boot_dir(profile, target) is None:
        wanted = " or ".join(f"/{d}/config.txt" for d in profile.boot_dirs)
        problems.append(f"no {wanted} on the target: not a Raspberry Pi boot layout (mount the boot "
                        "partition there when flashing an SD card)")
    return problems


def find_boot_dir(profile: BoardProfile, target: Target) -> str | None:
    for d in profile.boot_dirs:
        if target.read(f"/{d}/config.txt") is not None:
            return f"/{d}"
    return None


# -- content -------------------------------------------------------------------------------------
def source_files() -> dict[str, bytes]:
    """Files of the firmware source tree, by path relative to /opt/usbmirror/src."""
    out: dict[str, bytes] = {}
    for d in SOURCE_DIRS:
        for p in sorted((REPO / d).rglob("*.py")):
            if "__pycache__" not in p.parts:
                out[str(p.relative_to(REPO))] = p.read_bytes()
    for name in SOURCE_FILES:
        if (REPO / name).is_file():
            out[name] = (REPO / name).read_bytes()
    for pattern in DOC_GLOBS:
        for p in sorted(REPO.glob(pattern)):
            out[str(p.relative_to(REPO))] = p.read_bytes()
    return out


def source_hash(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def config_template(profile: BoardProfile) -> str:
    head = (f"# usbmirror {profile.role} unit configuration, written once by `make flash` for board profile "
            f"{profile.name}.\n# Edit freely: flashing again never overwrites this file. Every key is also a "
            f"command-line option\n# (`usbmirror {profile.role} --help`).\n")
    if profile.role == "local":
        return head + f"""
volume = "/dev/disk/by-id/CHANGE-ME"   # the disk the server sees: a block device or an image file
# size = "32G"                          # only for an image file that does not exist yet
journal = "{profile.journal or '/var/lib/usbmirror/journal'}"
journal-size = "1G"
write-cache = "off"                    # off: a WRITE completes once it is durable in the journal
gadget = "{profile.udc}"                 # UDC in /sys/class/udc; "" = the first one
acm-console = "on"                     # read-only status console on a USB serial port
state-dir = "/var/lib/usbmirror"
# source-id = "site-a"                 # this unit's name towards remotes (matches its certificate)
# tls-dir = "/etc/usbmirror/tls"       # made by `usbmirror pair`

# [[remote]]
# address = "remote.example.net:7373"
# mode = "async"                       # or "sync": acknowledge the server only once this remote has it
"""
    return head + """
listen = "0.0.0.0:7373"
name = "CHANGE-ME"                     # this remote's name (matches its certificate)
tls-dir = "/etc/usbmirror/tls"         # made by `usbmirror pair`
state-dir = "/var/lib/usbmirror"

[targets]
# site-a = "/dev/disk/by-id/ata-CHANGE-ME"   # one drive, partition or md RAID set per source
"""


def edit_config_txt(old: str, lines: tuple[str, ...]) -> str:
    """Replace (or append) our marked block; `[all]` first so an earlier `[pi0]` filter does not
    swallow it."""
    block = "\n".join([BEGIN_MARK, "[all]", *lines, END_MARK]) + "\n"
    if BEGIN_MARK in old and END_MARK in old:
        before, _, rest = old.partition(BEGIN_MARK)
        _, _, after = rest.partition(END_MARK)
        return before + block.rstrip("\n") + after
    sep = "" if not old or old.endswith("\n") else "\n"
    return old + sep + block


def edit_cmdline(old: str, modules: tuple[str, ...]) -> str:
    """cmdline.txt is one line: merge our modules into `modules-load=` keeping everything else."""
    tokens = old.strip().split()
    existing: list[str] = []
    rest: list[str] = []
    for tok in tokens:
        if tok.startswith("modules-load="):
            existing += [m for m in tok.split("=", 1)[1].split(",") if m]
        else:
            rest.append(tok)
    merged = existing + [m for m in modules if m not in existing]
    if not merged:
        return old
    # keep modules-load right after rootwait-like tokens: order does not matter to the kernel
    return " ".join([*rest, "modules-load=" + ",".join(merged)]) + "\n"


@dataclass
class Change:
    path: str
    what: str


@dataclass
class Installer:
    profile: BoardProfile
    target: Target
    dry_run: bool = False
    wheels: Path | None = None
    changes: list[Change] = field(default_factory=list)
    unchanged: int = 0
    notes: list[str] = field(default_factory=list)

    def put(self, path: str, data: bytes, mode: int = 0o644, *, only_if_absent: bool = False) -> bool:
        old = self.target.read(path)
        if old is not None and (only_if_absent or (old == data and self.target.mode(path) == mode)):
            self.unchanged += 1
            return False
        self.changes.append(Change(path, "created" if old is None else "updated"))
        if not self.dry_run:
            self.target.write(path, data, mode)
        return True

    def link(self, path: str, points_to: str) -> bool:
        if self.target.readlink(path) == points_to:
            self.unchanged += 1
            return False
        self.changes.append(Change(path, f"linked -> {points_to}"))
        if not self.dry_run:
            self.target.symlink(path, points_to)
        return True

    def install(self) -> None:
        p = self.profile
        files = source_files()
        digest = source_hash(files)
        for rel, data in files.items():
            self.put(f"{PREFIX}/src/{rel}", data)
        self.put(f"{PREFIX}/src/SOURCE_HASH", (digest + "\n").encode())
        self.put(f"{PREFIX}/install-venv.sh", INSTALL_VENV.encode(), 0o755)
        if self.wheels is not None:
            for whl in sorted(self.wheels.glob("*.whl")):
                self.put(f"{PREFIX}/wheels/{whl.name}", whl.read_bytes())
        # systemd: the install unit and the role's unit, enabled the way `systemctl enable` does.
        for unit in ("usbmirror-install.service", p.unit):
            self.put(f"/etc/systemd/system/{unit}", (SYSTEMD / unit).read_bytes())
            self.link(f"/etc/systemd/system/multi-user.target.wants/{unit}", f"/etc/systemd/system/{unit}")
        self.put("/etc/usbmirror/board.toml", (BOARDS / f"{p.name}.toml").read_bytes())
        self.put(f"/etc/usbmirror/{p.role}.toml", config_template(p).encode(), 0o600, only_if_absent=True)
        self.put("/etc/systemd/journald.conf.d/usbmirror.conf",
                 b"# usbmirror: keep the system journal across reboots (incident analysis)\n"
                 b"[Journal]\nStorage=persistent\nSystemMaxUse=200M\n")
        if p.modules_load:
            self.put("/etc/modules-load.d/usbmirror.conf",
                     ("# usbmirror gadget stack (board profile " + p.name + ")\n"
                      + "\n".join(p.modules_load) + "\n").encode())
        self._boot_config()
        for step in p.manual_steps:
            self.notes.append(f"manual step for {p.name}: {step}")

    def _boot_config(self) -> None:
        p = self.profile
        if not (p.config_txt or p.cmdline_modules):
            return
        boot = find_boot_dir(p, self.target)
        if boot is None:
            raise FlashError(f"no config.txt under {', '.join(p.boot_dirs)} on the target")
        if p.config_txt:
            old = (self.target.read(f"{boot}/config.txt") or b"").decode()
            new = edit_config_txt(old, p.config_txt)
            if self.put(f"{boot}/config.txt", new.encode(), self.target.mode(f"{boot}/config.txt") or 0o755):
                self.notes.append("boot configuration changed: reboot the board to apply it")
        if p.cmdline_modules:
            old_raw = self.target.read(f"{boot}/cmdline.txt")
            if old_raw is None:
                raise FlashError(f"{boot}/cmdline.txt missing on the target")
            new = edit_cmdline(old_raw.decode(), p.cmdline_modules)
            if self.put(f"{boot}/cmdline.txt", new.encode(), self.target.mode(f"{boot}/cmdline.txt") or 0o755):
                self.notes.append("kernel command line changed: reboot the board to apply it")

    def finish_live(self) -> None:
        """On a running board: build the venv now and let systemd see the units."""
        if self.dry_run or not self.target.live:
            return
        proc = self.target.run(f"sh {PREFIX}/install-venv.sh && systemctl daemon-reload")
        if proc.returncode != 0:
            raise FlashError(f"installing the Python environment failed:\n{proc.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make flash", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--board", required=True, help=f"board profile: {', '.join(list_profiles())}")
    ap.add_argument("--target", required=True, help="user@host (SSH) or the path of a mounted root file system")
    ap.add_argument("--wheels", type=Path, help="directory of wheels to install offline (usbmirror-*.whl and deps)")
    ap.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    ap.add_argument("--force", action="store_true", help="install even if the profile does not match the target")
    ap.add_argument("--no-venv", action="store_true",
                    help="over SSH: do not build the venv now (usbmirror-install.service builds it at boot)")
    ap.add_argument("--ssh", default="ssh", help="ssh command to reach the target (default: ssh)")
    a = ap.parse_args(argv)
    try:
        profile = load_profile(a.board)
        target = open_target(a.target, ssh=a.ssh)
        problems = check_profile(profile, target)
        if problems and not a.force:
            for msg in problems:
                print(f"flash: refusing profile {profile.name} for {target.description}: {msg}", file=sys.stderr)
            print("flash: pass FLASH_ARGS=--force (make) or --force to install anyway", file=sys.stderr)
            return 2
        inst = Installer(profile, target, dry_run=a.dry_run, wheels=a.wheels)
        inst.install()
        for ch in inst.changes:
            print(f"{'would be ' if a.dry_run else ''}{ch.what:9s} {ch.path}")
        if not a.no_venv:
            inst.finish_live()
    except FlashError as exc:
        print(f"flash: {exc}", file=sys.stderr)
        return 1
    verb = "would change" if a.dry_run else "changed"
    print(f"flash: {profile.name} ({profile.role}) onto {target.description}: {len(inst.changes)} {verb}, "
          f"{inst.unchanged} unchanged")
    for note in inst.notes:
        print(f"flash: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
