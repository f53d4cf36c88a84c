"""Builds the QEMU guest that plays a real USB host: Debian's stock kernel plus a busybox initramfs.

Everything comes from Debian packages fetched with ``apt-get download`` and unpacked with ``dpkg -x``
(nothing is installed on the host). Results are cached under ``$USBMIRROR_CACHE`` (default
``<repo>/.cache/guest``), keyed by package versions and by this file's content, so a rebuild happens
only when something changes.

Outputs (see :class:`GuestImage`):

* ``vmlinux`` -- the uncompressed kernel ELF, booted through its PVH entry (taken from the package, or
  extracted from the bzImage's xz payload);
* the base initramfs layer (cpio newc): busybox, usbip, sg3-utils, e2fsprogs, dosfstools, sfdisk,
  blkdiscard, fio, their shared libraries, the kernel modules for USB/IP + usb-storage + ext4/vfat and
  ``/init``;
* optionally a Python layer: Debian's python3.11 runtime (precompiled ``.pyc``) and the gadget-side
  modules (dummy_hcd, libcomposite, configfs, usb_f_fs, usb_f_mass_storage).

Run ``python -m hw.qemu.build_guest [--python]`` to build (or just check) the cache.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import lzma
import os
import py_compile
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from firmware.atomic import write_atomically

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ARCH = "amd64"

# Packages whose binaries go into the base layer: package -> paths (or None: every executable it ships).
TOOL_PACKAGES: dict[str, tuple[str, ...] | None] = {
    "busybox-static": ("bin/busybox",),
    "usbip": None,
    "sg3-utils": None,
    "e2fsprogs": None,
    "dosfstools": None,
    "fdisk": ("sbin/sfdisk",),
    "util-linux": ("sbin/blkdiscard", "sbin/blockdev", "sbin/wipefs", "bin/lsblk"),
    "fio": ("usr/bin/fio",),
}
DATA_PACKAGES = ("usb.ids",)
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libgcc-s1")

# Modules loaded at boot, in this order (dependencies are inserted before each one).
BASE_MODULES = (
    "virtio_pci", "virtio_net",
    "crc32c_generic", "crc32c_intel", "libcrc32c",
    "usbip_core", "vhci_hcd", "usb_storage", "uas", "sd_mod", "sg",
    "ext4", "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1", "nls_utf8", "loop",
)
GADGET_MODULES = ("configfs", "libcomposite", "dummy_hcd", "usb_f_fs", "usb_f_mass_storage")
MODULE_PARAMS = {"usb_storage": "delay_use=0"}

# Dependencies never followed into the image (maintainer-script helpers, not libraries).
SKIP_DEPENDS = frozenset({"libc-bin", "libc-l10n", "libpam-modules-bin", "libpam-runtime", "libpam-modules"})
# Library packages whose names do not start with "lib".
LIBRARY_PACKAGES = frozenset({"zlib1g"})

GUEST_IP = "10.0.2.15"
USBIP_ADDR = "10.0.2.100"
DEFAULT_LIBDIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")


class BuildError(RuntimeError):
    """The guest could not be built (missing package, unresolved library, apt failure)."""


def cache_dir() -> Path:
    env = os.environ.get("USBMIRROR_CACHE")
    return Path(env) if env else REPO / ".cache" / "guest"


# ---------------------------------------------------------------------------------------------- cpio


class CpioWriter:
    """Writes one cpio "newc" archive (one initramfs layer); the result is padded to 4 bytes."""

    def __init__(self, ino_base: int = 1) -> None:
        self._buf = io.BytesIO()
        self._ino = ino_base
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, mtime: int = 0,
               rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        name = name.strip("/")
        if name in self._names:
            return
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf.write(header + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def has(self, name: str) -> bool:
        return name.strip("/") in self._names

    def mkdirs(self, name: str) -> None:
        parts = PurePosixPath(name.strip("/")).parts
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdirs(str(PurePosixPath(name.strip("/")).parent))
        self._entry(name, stat.S_IFREG | (mode & 0o7777), data)

    def add_symlink(self, name: str, target: str) -> None:
        self.mkdirs(str(PurePosixPath(name.strip("/")).parent))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.mkdirs(str(PurePosixPath(name.strip("/")).parent))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        self._pad()
        return self._buf.getvalue()


# ----------------------------------------------------------------------------------------------- ELF


@dataclass(frozen=True)
class ElfDynamic:
    needed: tuple[str, ...]
    runpath: tuple[str, ...]
    interp: str | None


def read_elf_dynamic(data: bytes) -> ElfDynamic | None:
    """DT_NEEDED, DT_RPATH/DT_RUNPATH and PT_INTERP of a 64-bit little-endian ELF; None if not one."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dyn: tuple[int, int] | None = None
    interp = None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dyn = (p_offset, p_filesz)
        elif p_type == 3:
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    if dyn is None:
        return ElfDynamic((), (), interp)
    entries: list[tuple[int, int]] = []
    for off in range(dyn[0], dyn[0] + dyn[1], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        entries.append((tag, val))
    strtab_vaddr = next((v for t, v in entries if t == 5), None)
    if strtab_vaddr is None:
        return ElfDynamic((), (), interp)
    strtab = next((off + strtab_vaddr - va for va, off, sz in loads if va <= strtab_vaddr < va + sz), None)
    if strtab is None:
        raise BuildError("ELF string table outside any PT_LOAD segment")

    def string(offset: int) -> str:
        start = strtab + offset
        return data[start:data.index(b"\0", start)].decode()

    needed = tuple(string(v) for t, v in entries if t == 1)
    runpath: list[str] = []
    for t, v in entries:
        if t in (15, 29):
            runpath.extend(p for p in string(v).split(":") if p)
    return ElfDynamic(needed, tuple(runpath), interp)


def elf_section(data: bytes, wanted: str) -> bytes | None:
    """Contents of a named section of a 64-bit little-endian ELF (kernel modules: ``.modinfo``)."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    for name_idx, _type, _flags, _addr, offset, size in sections:
        start = names_off + name_idx
        if data[start:data.index(b"\0", start)].decode() == wanted:
            return data[offset:offset + size]
    return None


# ------------------------------------------------------------------------------------------- kernel


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed kernel ELF inside a bzImage (boot protocol >= 2.08 payload fields)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise BuildError("not a bzImage (no HdrS signature)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start:start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        import zlib
        data = zlib.decompressobj(31).decompress(payload)
    else:
        raise BuildError(f"unsupported kernel payload compression (magic {payload[:6].hex()})")
    if not data.startswith(b"\x7fELF"):
        raise BuildError("decompressed kernel payload is not an ELF file")
    return data


@dataclass(frozen=True)
class KernelModule:
    name: str
    path: str  # relative to /lib/modules/<version>
    depends: tuple[str, ...]


class ModuleIndex:
    """Finds kernel modules and their dependencies (``depends=`` and ``softdep=pre:`` in .modinfo)."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self.by_name: dict[str, Path] = {}
        for path in moddir.rglob("*.ko*"):
            stem = path.name.split(".ko")[0]
            self.by_name[stem.replace("-", "_")] = path
        self.builtin = set()
        builtin = moddir / "modules.builtin"
        if builtin.exists():
            for line in builtin.read_text().split():
                self.builtin.add(PurePosixPath(line).name.split(".ko")[0].replace("-", "_"))

    def module(self, name: str) -> KernelModule | None:
        name = name.replace("-", "_")
        if name in self.builtin:
            return None
        path = self.by_name.get(name)
        if path is None:
            raise BuildError(f"kernel module {name!r} not found in {self.moddir}")
        info = elf_section(read_module(path), ".modinfo") or b""
        deps: list[str] = []
        for field in info.split(b"\0"):
            key, _, value = field.decode(errors="replace").partition("=")
            if key == "depends" and value:
                deps.extend(value.split(","))
            elif key == "softdep":
                pre = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", value)
                if pre:
                    deps.extend(d for d in pre.group(1).split() if d.replace("-", "_") in self.by_name)
        rel = str(path.relative_to(self.moddir))
        return KernelModule(name, rel, tuple(deps))

    def load_order(self, names: Iterable[str]) -> list[KernelModule]:
        order: list[KernelModule] = []
        seen: set[str] = set()

        def visit(name: str, stack: tuple[str, ...]) -> None:
            key = name.replace("-", "_")
            if key in seen or key in stack:
                return
            mod = self.module(key)
            if mod is None:
                seen.add(key)
                return
            for dep in mod.depends:
                visit(dep, (*stack, key))
            seen.add(key)
            order.append(mod)

        for name in names:
            visit(name, ())
        return order


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


# ---------------------------------------------------------------------------------------------- apt


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    depends: tuple[tuple[str, ...], ...]  # alternatives per dependency
    arch: str = ARCH

    @property
    def file_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _run(cmd: list[str], **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return str(proc.stdout)


def _parse_depends(value: str) -> tuple[tuple[str, ...], ...]:
    out = []
    for item in value.split(","):
        alts = tuple(re.sub(r"[\s(\[].*$", "", a.strip()).split(":")[0] for a in item.split("|"))
        out.append(tuple(a for a in alts if a))
    return tuple(a for a in out if a)


def apt_show(names: Iterable[str]) -> dict[str, DebPackage]:
    """Candidate version and dependencies of each package; apt lists are refreshed if missing."""
    names = sorted(set(names))
    if not names:
        return {}
    try:
        text = _run(["apt-cache", "show", "--no-all-versions", *names])
    except BuildError:
        if not _have_lists():
            _run(["apt-get", "update"])
            text = _run(["apt-cache", "show", "--no-all-versions", *names])
        else:
            raise
    found: dict[str, DebPackage] = {}
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        current = ""
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and current:
                fields[current] += " " + line.strip()
            elif ":" in line:
                current, _, value = line.partition(":")
                fields[current] = value.strip()
        if "Package" not in fields:
            continue
        deps = _parse_depends(", ".join(filter(None, (fields.get("Pre-Depends"), fields.get("Depends")))))
        found.setdefault(fields["Package"], DebPackage(fields["Package"], fields["Version"], deps,
                                                             fields.get("Architecture", ARCH)))
    return found


def _lists_fingerprint() -> list[tuple[str, int, int]]:
    lists = Path("/var/lib/apt/lists")
    if not lists.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in lists.iterdir() if p.is_file()
                  and p.name != "lock")


def _have_lists() -> bool:
    lists = Path("/var/lib/apt/lists")
    return lists.exists() and any(p.name.endswith(("Packages", "Packages.lz4", "Packages.gz", "Packages.xz"))
                                  for p in lists.iterdir())


def resolve_packages(roots: Iterable[str]) -> dict[str, DebPackage]:
    """The root packages plus every library package (``lib*``) they depend on, transitively."""
    wanted = set(roots)
    resolved: dict[str, DebPackage] = {}
    pending = set(wanted)
    while pending:
        info = apt_show(pending)
        missing = pending - set(info)
        if missing & wanted:
            raise BuildError(f"packages not available from apt: {sorted(missing & wanted)}")
        resolved.update(info)
        pending = set()
        for pkg in info.values():
            for alts in pkg.depends:
                if any(a in resolved for a in alts):
                    continue
                choice = alts[0]
                if (choice.startswith("lib") or choice in LIBRARY_PACKAGES) and choice not in SKIP_DEPENDS:
                    pending.add(choice)
        pending -= set(resolved)
    return resolved


def kernel_package() -> str:
    meta = apt_show(["linux-image-amd64"]).get("linux-image-amd64")
    if meta is None:
        raise BuildError("linux-image-amd64 not known to apt")
    for alts in meta.depends:
        for name in alts:
            if re.fullmatch(r"linux-image-6\.1\.0-\d+-amd64", name):
                return name
    raise BuildError(f"linux-image-amd64 does not depend on a 6.1.0 amd64 kernel: {meta.depends}")


def download(pkgs: Iterable[DebPackage], debdir: Path) -> list[Path]:
    debdir.mkdir(parents=True, exist_ok=True)
    pkgs = list(pkgs)
    missing = [p for p in pkgs if not (debdir / p.file_name).exists()]
    if missing:
        with tempfile.TemporaryDirectory(dir=debdir) as tmp:
            log.info("apt-get download count=%d", len(missing))
            _run(["apt-get", "download", *(f"{p.name}={p.version}" for p in missing)], cwd=tmp)
            for p in missing:
                src = Path(tmp) / p.file_name
                if not src.exists():
                    raise BuildError(f"apt-get download did not produce {p.file_name}")
                src.rename(debdir / p.file_name)
    return [debdir / p.file_name for p in pkgs]


def unpack(debs: Iterable[Path], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)])


# ------------------------------------------------------------------------------------ tree -> cpio


class TreeCollector:
    """Copies paths from an unpacked Debian tree into a cpio layer, following symlinks and libraries."""

    def __init__(self, root: Path, cpio: CpioWriter, *, also_present: Iterable[str] = ()) -> None:
        self.root = root
        self.cpio = cpio
        self.present = set(also_present)  # files another layer already provides
        self.missing: dict[str, set[str]] = {}

    def _host(self, guest_path: str) -> Path:
        return self.root / guest_path.lstrip("/")

    def resolve(self, guest_path: str, *, record: bool = True, depth: int = 0) -> str | None:
        """Canonical guest path of guest_path; symlinks on the way are added to the layer."""
        if depth > 20:
            return None
        parts = PurePosixPath("/" + guest_path.lstrip("/")).parts[1:]
        current = PurePosixPath("/")
        for i, part in enumerate(parts):
            candidate = current / part
            host = self._host(str(candidate))
            if host.is_symlink():
                target = os.readlink(host)
                if record:
                    self.cpio.add_symlink(str(candidate), target)
                base = PurePosixPath(target) if target.startswith("/") else current / target
                rest = PurePosixPath(*parts[i + 1:]) if i + 1 < len(parts) else None
                joined = str(base / rest) if rest else str(base)
                return self.resolve(os.path.normpath(joined), record=record, depth=depth + 1)
            if not host.exists():
                return None
            current = candidate
        return str(current)

    def exists(self, guest_path: str) -> bool:
        return self.resolve(guest_path, record=False) is not None

    def add(self, guest_path: str, *, follow_libs: bool = True, mode: int | None = None) -> None:
        real = self.resolve(guest_path)
        if real is None:
            raise BuildError(f"{guest_path} not found in {self.root}")
        host = self._host(real)
        if host.is_dir():
            self.cpio.mkdirs(real)
            for child in sorted(host.iterdir()):
                self.add(f"{real}/{child.name}", follow_libs=follow_libs)
            return
        if self.cpio.has(real) or real in self.present:
            return
        data = host.read_bytes()
        self.cpio.add_file(real, data, mode if mode is not None else host.stat().st_mode)
        if follow_libs:
            self.add_libraries(real, data)

    def add_libraries(self, real: str, data: bytes) -> None:
        dyn = read_elf_dynamic(data)
        if dyn is None:
            return
        if dyn.interp:
            self.add(dyn.interp)
        origin = str(PurePosixPath(real).parent)
        search = [p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for p in dyn.runpath]
        search += ["/" + d for d in DEFAULT_LIBDIRS]
        for lib in dyn.needed:
            for d in search:
                path = f"{d}/{lib}"
                if path in self.present or self.exists(path):
                    if path not in self.present:
                        self.add(path)
                    break
            else:
                self.missing.setdefault(lib, set()).add(real)


# ------------------------------------------------------------------------------------------ builder


INIT_SCRIPT = r"""#!/bin/sh
# usbmirror guest init: mount, load drivers, bring up the one network path, run /run.sh, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var /root /mnt
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ln -sfn /run /var/run
echo /bin/false > /proc/sys/kernel/modprobe 2>/dev/null
KVER=$(cat /etc/kernel-version)
while read -r mod args; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$KVER/$mod" $args 2>/tmp/insmod.err || {
        grep -q 'File exists' /tmp/insmod.err || echo "@@USBMIRROR insmod-failed=$mod $(cat /tmp/insmod.err)"
    }
done < /etc/modules.order
[ -w /sys/module/usb_storage/parameters/delay_use ] && echo 0 > /sys/module/usb_storage/parameters/delay_use
ip link set lo up
ip link set eth0 up 2>/dev/null && ip addr add __GUEST_IP__/24 dev eth0
if [ -x /usr/bin/python3 ]; then
    export PYTHONPATH=/opt/usbmirror PYTHONDONTWRITEBYTECODE=1
fi
echo "@@USBMIRROR-READY"
cd /tmp
sh /run.sh
rc=$?
sync
echo "@@USBMIRROR-EXIT rc=$rc"
poweroff -f
sleep 5
"""

LOAD_GADGET = r"""#!/bin/sh
# Load the gadget-side modules (dummy_hcd parameters may be given, e.g. is_super_speed=1).
KVER=$(cat /etc/kernel-version)
while read -r mod; do
    case "$mod" in
        */dummy_hcd.ko*) insmod "/lib/modules/$KVER/$mod" "$@" ;;
        *) insmod "/lib/modules/$KVER/$mod" 2>/dev/null ;;
    esac
done < /etc/gadget-modules.order
grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs configfs /sys/kernel/config
"""


@dataclass(frozen=True)
class GuestImage:
    vmlinux: Path
    base_initrd: Path
    python_initrd: Path | None
    kernel_version: str


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _key(*parts: object) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _kernel_version(root: Path) -> str:
    versions = [p.name for p in (root / "lib/modules").iterdir()]
    if len(versions) != 1:
        raise BuildError(f"expected one kernel module tree, found {versions}")
    return versions[0]


def _add_modules(cpio: CpioWriter, root: Path, kver: str, names: Iterable[str], order_file: str,
                 *, skip: Iterable[str] = ()) -> list[KernelModule]:
    moddir = root / "lib/modules" / kver
    mods = ModuleIndex(moddir).load_order(names)
    skip_set = set(skip)
    mods = [m for m in mods if m.name not in skip_set]
    lines = []
    for mod in mods:
        rel = mod.path
        data = read_module(moddir / rel)
        for ext in (".xz", ".zst", ".gz"):
            rel = rel.removesuffix(ext)
        cpio.add_file(f"lib/modules/{kver}/{rel}", data)
        params = MODULE_PARAMS.get(mod.name, "")
        lines.append(f"{rel} {params}".rstrip())
    cpio.add_file(order_file, ("\n".join(lines) + "\n").encode())
    return mods


def _tool_paths(root: Path, deb: Path, only: tuple[str, ...] | None) -> list[str]:
    if only is not None:
        return ["/" + p for p in only]
    paths = []
    for line in _run(["dpkg-deb", "-c", str(deb)]).splitlines():
        cols = line.split()
        if len(cols) < 6:
            continue
        perms, name = cols[0], cols[5].lstrip(".")
        executable = perms.startswith("-") and "x" in perms
        if (executable or perms.startswith("l")) and re.match(r"^/(usr/)?s?bin/", name):
            paths.append(name)
    return paths


def _busybox_applets(root: Path) -> list[str]:
    out = _run([str(root / "bin/busybox"), "--list-full"])
    return [line.strip() for line in out.splitlines() if line.strip()]


class GuestBuilder:
    """Builds (or finds in the cache) the kernel and initramfs layers."""

    def __init__(self, cache: Path | None = None) -> None:
        self.cache = cache or cache_dir()
        self.debdir = self.cache / "debs"

    def _resolve(self, kind: str) -> tuple[str, dict[str, DebPackage]]:
        """(kernel package, package set) for "base" or "python"; remembered until the apt lists change."""
        path = self.cache / f"resolve-{_key(kind, _lists_fingerprint())}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            pkgs = {n: DebPackage(n, v, tuple(tuple(a) for a in deps), arch)
                    for n, (v, arch, deps) in saved["packages"].items()}
            return str(saved["kernel"]), pkgs
        kpkg = kernel_package()
        roots = [kpkg, "libc6", *TOOL_PACKAGES, *DATA_PACKAGES] if kind == "base" else [*PYTHON_PACKAGES, "libc6"]
        pkgs = resolve_packages(roots)
        data = {"kernel": kpkg, "packages": {n: [p.version, p.arch, p.depends] for n, p in pkgs.items()}}
        if _lists_fingerprint():
            write_atomically(path, json.dumps(data).encode(), 0o644)
        return kpkg, pkgs

    def build(self, *, python: bool = False) -> GuestImage:
        with _locked(self.cache / "lock"):
            kpkg, base_pkgs = self._resolve("base")
            kver_pkg = base_pkgs[kpkg]
            versions = {n: p.version for n, p in sorted(base_pkgs.items())}
            base_key = _key("base", versions, BASE_MODULES, MODULE_PARAMS, INIT_SCRIPT)
            meta_path = self.cache / f"base-{base_key}.json"
            vmlinux = self.cache / f"vmlinux-{kpkg}-{kver_pkg.version}"
            base_cpio = self.cache / f"base-{base_key}.cpio"
            if not (meta_path.exists() and base_cpio.exists() and vmlinux.exists()):
                self._build_base(base_pkgs, kpkg, vmlinux, base_cpio, meta_path)
                self._prune("base-*.cpio", "base-*.json", "resolve-*.json")
            meta = json.loads(meta_path.read_text())
            py_cpio = None
            if python:
                _kernel, py_pkgs = self._resolve("python")
                py_versions = {n: p.version for n, p in sorted(py_pkgs.items())}
                py_key = _key("python", py_versions, base_key, GADGET_MODULES, LOAD_GADGET)
                py_cpio = self.cache / f"python-{py_key}.cpio"
                if not py_cpio.exists():
                    self._build_python(py_pkgs, base_pkgs[kpkg], meta, py_cpio)
                    self._prune("python-*.cpio")
            return GuestImage(vmlinux, base_cpio, py_cpio, str(meta["kernel_version"]))

    def _prune(self, *patterns: str, keep: int = 2) -> None:
        """Delete all but the newest `keep` cached files of each pattern (old keys are never used again)."""
        for pattern in patterns:
            files = sorted(self.cache.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in files[keep:]:
                old.unlink(missing_ok=True)

    def _build_base(self, pkgs: dict[str, DebPackage], kpkg: str, vmlinux: Path, out: Path,
                    meta_path: Path) -> None:
        log.info("building base guest layer packages=%d", len(pkgs))
        debs = dict(zip(pkgs, download(pkgs.values(), self.debdir), strict=True))
        with tempfile.TemporaryDirectory(dir=self.cache, prefix="stage-") as tmp:
            root = Path(tmp)
            unpack(debs.values(), root)
            kver = _kernel_version(root)
            if not vmlinux.exists():
                plain = root / "boot" / f"vmlinux-{kver}"
                data = plain.read_bytes() if plain.exists() else extract_vmlinux(
                    (root / "boot" / f"vmlinuz-{kver}").read_bytes())
                write_atomically(vmlinux, data, 0o644)
            cpio = CpioWriter(ino_base=1)
            for d in ("dev", "proc", "sys", "run", "tmp", "var", "root", "mnt", "etc", "usr/local/bin"):
                cpio.mkdirs(d)
            cpio.add_chardev("dev/console", 5, 1)
            cpio.add_chardev("dev/null", 1, 3, 0o666)
            tree = TreeCollector(root, cpio)
            for pkg, only in TOOL_PACKAGES.items():
                for path in _tool_paths(root, debs[pkg], only):
                    tree.add(path)
            for pkg in DATA_PACKAGES:
                for line in _run(["dpkg-deb", "-c", str(debs[pkg])]).splitlines():
                    name = line.split()[5].lstrip(".")
                    if line.startswith("-") and "/doc/" not in name:
                        tree.add(name)
            if tree.missing:
                raise BuildError(f"unresolved shared libraries: {sorted(tree.missing.items())}")
            real_tools = {PurePosixPath(n).name for n in cpio._names if re.match(r"^(usr/)?s?bin/", n)}
            for applet in _busybox_applets(root):
                name = PurePosixPath(applet).name
                if name not in real_tools and not cpio.has(applet) and not tree.exists(applet):
                    cpio.add_symlink(applet, "/bin/busybox")
            mods = _add_modules(cpio, root, kver, BASE_MODULES, "etc/modules.order")
            cpio.add_file("etc/kernel-version", kver.encode() + b"\n")
            cpio.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
            cpio.add_file("etc/group", b"root:x:0:\n")
            cpio.add_file("init", INIT_SCRIPT.replace("__GUEST_IP__", GUEST_IP).encode(), 0o755)
            write_atomically(out, cpio.finish(), 0o644)
            meta = {"kernel_version": kver, "packages": {n: p.version for n, p in pkgs.items()},
                    "modules": [m.name for m in mods], "files": sorted(cpio._names)}
            write_atomically(meta_path, json.dumps(meta, indent=1).encode(), 0o644)
            log.info("base layer built bytes=%d modules=%d", out.stat().st_size, len(mods))

    def _build_python(self, pkgs: dict[str, DebPackage], kpkg: DebPackage, base_meta: dict[str, object],
                      out: Path) -> None:
        log.info("building python guest layer packages=%d", len(pkgs))
        all_pkgs = {**pkgs, kpkg.name: kpkg}
        debs = download(all_pkgs.values(), self.debdir)
        base_files = {"/" + f for f in base_meta["files"]}  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory(dir=self.cache, prefix="stage-") as tmp:
            root = Path(tmp)
            unpack(debs, root)
            kver = str(base_meta["kernel_version"])
            stdlib = root / "usr/lib/python3.11"
            for junk in ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"):
                shutil.rmtree(stdlib / junk, ignore_errors=True)
            for cache in stdlib.rglob("__pycache__"):
                shutil.rmtree(cache)
            compileall.compile_dir(str(stdlib), quiet=1, ddir="/usr/lib/python3.11", workers=2,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            cpio = CpioWriter(ino_base=1_000_000)
            tree = TreeCollector(root, cpio, also_present=base_files)
            tree.add("/usr/bin/python3.11")
            cpio.add_symlink("usr/bin/python3", "python3.11")
            tree.add("/usr/lib/python3.11", follow_libs=False)
            for so in sorted((root / "usr/lib/python3.11/lib-dynload").glob("*.so")):
                probe = TreeCollector(root, CpioWriter(), also_present=base_files | set(tree.cpio._names))
                probe.add_libraries(str(so), so.read_bytes())
                if probe.missing:
                    log.info("python extension skipped module=%s missing=%s", so.name, sorted(probe.missing))
                    continue
                tree.add_libraries("/" + str(so.relative_to(root)), so.read_bytes())
            for lib in ("libgcc_s.so.1",):
                tree.add(f"/lib/x86_64-linux-gnu/{lib}")
            if tree.missing:
                raise BuildError(f"unresolved shared libraries for python: {sorted(tree.missing.items())}")
            base_mods = set(base_meta["modules"])  # type: ignore[call-overload]
            _add_modules(cpio, root, kver, GADGET_MODULES, "etc/gadget-modules.order", skip=base_mods)
            cpio.add_file("usr/local/bin/load_gadget_modules", LOAD_GADGET.encode(), 0o755)
            write_atomically(out, cpio.finish(), 0o644)
            log.info("python layer built bytes=%d", out.stat().st_size)


# ------------------------------------------------------------------------------- per-run layers


def script_layer(script: str, extra_files: dict[str, bytes] | None = None) -> bytes:
    """The per-run layer: /run.sh plus any extra files (paths absolute in the guest)."""
    cpio = CpioWriter(ino_base=3_000_000)
    cpio.add_file("run.sh", script.encode(), 0o755)
    for name, data in (extra_files or {}).items():
        mode = 0o755 if data.startswith(b"#!") or data.startswith(b"\x7fELF") else 0o644
        cpio.add_file(name, data, mode)
    return cpio.finish()


SOURCE_PACKAGES = ("firmware", "gadget")


def source_layer(packages: Iterable[str] = SOURCE_PACKAGES, site_packages: Iterable[str] = ("construct",),
                 ) -> bytes:
    """The project's Python sources (and chosen venv site-packages) under /opt/usbmirror, precompiled."""
    import importlib.util

    cpio = CpioWriter(ino_base=4_000_000)
    sources: list[tuple[Path, str]] = []
    for pkg in packages:
        for path in sorted((REPO / pkg).rglob("*.py")):
            sources.append((path, f"opt/usbmirror/{path.relative_to(REPO)}"))
    for name in site_packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise BuildError(f"site package {name!r} not importable on the host")
        top = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                sources.append((path, f"opt/usbmirror/{path.relative_to(top.parent)}"))
    with tempfile.TemporaryDirectory() as tmp:
        for path, guest in sources:
            cpio.add_file(guest, path.read_bytes())
            if path.suffix == ".py":
                guest_path = PurePosixPath(guest)
                pyc = guest_path.parent / "__pycache__" / f"{guest_path.stem}.cpython-311.pyc"
                target = Path(tmp) / "out.pyc"
                try:
                    py_compile.compile(str(path), cfile=str(target), dfile="/" + guest, doraise=True,
                                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
                except py_compile.PyCompileError:
                    continue
                cpio.add_file(str(pyc), target.read_bytes())
    return cpio.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--python", action="store_true", help="also build the Python + gadget layer")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        image = GuestBuilder().build(python=args.python)
    except BuildError as exc:
        print(f"guest build failed: {exc}", file=sys.stderr)
        return 1
    for label, path in (("kernel", image.vmlinux), ("base", image.base_initrd),
                        ("python", image.python_initrd)):
        if path is not None:
            print(f"{label:7s} {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"kernel version {image.kernel_version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
