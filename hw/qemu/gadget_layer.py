"""What the gadget-side QEMU tests add on top of `hw.qemu.guest`'s Python layer.

The guest built by `hw.qemu.build_guest --python` has Python 3.11, dummy_hcd, libcomposite,
configfs and usb_f_fs. The gadget tests also need:

- the ACM serial function on the device side (`u_serial`, `usb_f_acm`) and the host side's
  `cdc-acm` driver, so the status console can be read from `/dev/ttyACM0`;
- the pure-Python packages the firmware and the test use inside the guest: `functionfs` (and its
  imports `libaio`, `ioctl_opt`; `libaio.so.1` is already in the base layer because fio needs it),
  `pyserial`, and `pyusb` + `pytest` with `libusb-1.0.so.0` (from Debian's libusb-1.0-0) so the
  real-board pyusb tests can run against the gadget inside the guest.

They travel as `extra_files` of the per-run layer (a few hundred KB), cached under the guest
cache. `run_gadget_guest()` boots the guest with them; the guest script gets `load_gadget_stack
[dummy_hcd params]` which loads every gadget module and mounts configfs, `fwdie MESSAGE` (fail with
the tail of the firmware's log, `/tmp/fw.log`, and of the kernel's) and `gone DISK` (wait for a disk
to go away).
"""

from __future__ import annotations

import importlib.util
import io
import py_compile
import subprocess
import tarfile
import tempfile
from pathlib import Path

from hw.qemu.build_guest import (
    BuildError,
    GuestBuilder,
    GuestImage,
    cache_dir,
    download,
    kernel_package,
    resolve_packages,
)
from hw.qemu.guest import GuestResult, run_guest

# Relative to lib/modules/<kver>/ in the kernel package, in load order.
EXTRA_MODULES = (
    "kernel/drivers/usb/gadget/function/u_serial.ko",
    "kernel/drivers/usb/gadget/function/usb_f_acm.ko",
    "kernel/drivers/usb/class/cdc-acm.ko",
)
SITE_PACKAGES = ("functionfs", "libaio", "ioctl_opt", "serial",
                 # pyusb and pytest: host_tests/test_pyusb_board.py runs in the guest against the gadget
                 "usb", "pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py",
                 # the local unit itself (usbmirror local --gadget): the journal's CRC, pure Python here
                 "google_crc32c")
# Units with a journey link (the promote --gadget step): lz4 frames, and the certificates' expiry in
# status (cryptography and the cffi backend it loads). A bare local unit never imports them
# (host_tests/test_guest_imports.py); their compiled parts are copied too.
LINK_PACKAGES = ("lz4", "cryptography", "cffi", "_cffi_backend")
NATIVE_PACKAGES = frozenset({"lz4", "cryptography", "_cffi_backend"})
# pytest only needs pygments' terminal formatter and its Python and diff lexers: leave the rest out.
_PYGMENTS_KEEP = {"lexers": {"__init__.py", "_mapping.py", "python.py", "diff.py"},
                  "styles": {"__init__.py", "_mapping.py", "default.py"}}
LIBUSB_PACKAGE = "libusb-1.0-0"  # pyusb's backend; its only other need, libudev, is in the base layer

GADGET_FUNCTIONS = r"""
load_gadget_stack() {
    load_gadget_modules "$@"
    KVER=$(cat /etc/kernel-version)
    for m in $(cat /etc/gadget-extra-modules.order); do
        insmod "/lib/modules/$KVER/$m" 2>/dev/null
    done
    [ -e /sys/class/udc/dummy_udc.0 ] || die "no dummy_udc.0"
}
# the firmware's log is /tmp/fw.log: fwdie shows its tail and the kernel's before failing
fwdie() { echo "--- firmware log"; tail -40 /tmp/fw.log; dmesg | tail -25; die "$1"; }
# gone DISK: wait up to 10 s for /sys/block/DISK to go away
gone() { n=0; while [ -e /sys/block/$1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done; [ ! -e /sys/block/$1 ]; }
"""


def kernel_deb(builder: GuestBuilder) -> tuple[Path, str]:
    """The kernel package's .deb in the guest cache (downloaded by the base build) and its version."""
    kpkg = kernel_package()
    pkg = resolve_packages([kpkg])[kpkg]
    deb = builder.debdir / pkg.file_name
    if not deb.exists():
        raise BuildError(f"{deb} missing: run python -m hw.qemu.build_guest --python first")
    return deb, pkg.version


def extract_modules(deb: Path, modules: tuple[str, ...]) -> dict[str, bytes]:
    """The kernel modules `modules` (paths relative to lib/modules/<kver>/) from the kernel package,
    keyed by their path in the guest (lib/modules/<kver>/...)."""
    wanted = set(modules)
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                               check=True).stdout
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) > 4 and parts[1:3] == ["lib", "modules"]:
                rel = "/".join(parts[4:])
                if rel in wanted and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    found[f"lib/modules/{parts[3]}/{rel}"] = f.read()
    if len(found) != len(wanted):
        raise BuildError(f"kernel package lacks some of {sorted(wanted)}: found {sorted(found)}")
    return found


def gadget_extra_files() -> dict[str, bytes]:
    """Extra guest files (absolute guest path -> content) for the gadget tests, cached on disk."""
    builder = GuestBuilder()
    deb, version = kernel_deb(builder)
    cache = cache_dir() / f"gadget-extra-{version}"
    if not cache.exists():
        tmp = cache.with_name(cache.name + ".tmp")
        for rel, data in extract_modules(deb, EXTRA_MODULES).items():
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        tmp.rename(cache)
    files: dict[str, bytes] = {}
    for ko in sorted(cache.rglob("*.ko")):
        files["/" + str(ko.relative_to(cache))] = ko.read_bytes()
    files["/etc/gadget-extra-modules.order"] = ("\n".join(EXTRA_MODULES) + "\n").encode()
    files.update(_libusb(builder))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out.pyc"
        for name in (*SITE_PACKAGES, *LINK_PACKAGES):
            spec = importlib.util.find_spec(name)
            if spec is None or (spec.submodule_search_locations is None and spec.origin is None):
                raise BuildError(f"python package {name!r} is not installed in this venv")
            if spec.submodule_search_locations:
                top = Path(next(iter(spec.submodule_search_locations)))
                paths = sorted([*top.rglob("*.py"), *(top.rglob("*.so") if name in NATIVE_PACKAGES else ())])
            else:  # a single-file module
                assert spec.origin is not None
                top = Path(spec.origin)
                paths = [top]
            for path in paths:
                relpath = path.relative_to(top.parent)
                parts = relpath.parts
                if "__pycache__" in parts or "tests" in parts:
                    continue
                if parts[0] == "pygments" and len(parts) > 2 and parts[1] in _PYGMENTS_KEEP \
                        and parts[2] not in _PYGMENTS_KEEP[parts[1]]:
                    continue
                guest = f"/opt/usbmirror/{relpath}"
                files[guest] = path.read_bytes()
                if path.suffix == ".so":  # an extension module (same CPython and architecture as the guest)
                    continue
                # precompiled: imports in the TCG guest are several times faster
                py_compile.compile(str(path), cfile=str(out), dfile=guest, doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
                files[str(Path(guest).parent / "__pycache__" / f"{path.stem}.cpython-311.pyc")] = out.read_bytes()
    return files


def deb_member(builder: GuestBuilder, package: str, basename: str) -> bytes:
    """The file named `basename` in Debian package `package` (downloaded into the guest cache), symlinks followed."""
    pkg = resolve_packages([package])[package]
    (deb,) = download([pkg], builder.debdir)
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                               check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            if member.name.endswith("/" + basename):
                if member.issym():
                    return deb_member(builder, package, Path(member.linkname).name)
                f = tar.extractfile(member)
                if f is not None:
                    return f.read()
    raise BuildError(f"{deb.name} has no {basename}")


def _libusb(builder: GuestBuilder) -> dict[str, bytes]:
    """libusb-1.0.so.0 and what it needs beyond the base layer (libudev is there; glibc's
    libpthread.so.0 stub is not, since nothing else in the guest links it)."""
    lib = "/usr/lib/x86_64-linux-gnu"
    return {f"{lib}/libusb-1.0.so.0": deb_member(builder, LIBUSB_PACKAGE, "libusb-1.0.so.0"),
            f"{lib}/libpthread.so.0": deb_member(builder, "libc6", "libpthread.so.0")}


def run_gadget_guest(script: str, *, timeout: float, memory: int = 640, image: GuestImage | None = None,
                     extra_files: dict[str, bytes] | None = None) -> GuestResult:
    """Boot the guest with Python, the gadget modules and `load_gadget_stack`, and run `script`.
    `image` and `extra_files` may be passed in when several runs share them (building is not free)."""
    image = image or GuestBuilder().build(python=True)
    files = extra_files if extra_files is not None else gadget_extra_files()
    return run_guest(GADGET_FUNCTIONS + script, usbip_port=None, python_layer=True, timeout=timeout,
                     extra_files=files, memory=memory, image=image)
