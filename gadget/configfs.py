"""Compose the board's USB gadget with libcomposite through configfs, bind it to a UDC, tear it down.

A local unit on a real board is a USB *device*: the kernel's gadget framework (libcomposite) is told
through configfs what the device looks like, and the mass-storage function itself is a FunctionFS
function (`ffs.<instance>`) served from user space by `gadget.functionfs`. Optionally an ACM serial
function gives the host a read-only status console (`AcmStatusConsole` writes status text to the
device-side tty, `/dev/ttyGS<n>`).

Layout written under `<root>/usb_gadget/<name>/` (kernel: Documentation/usb/gadget_configfs.rst)::

    idVendor idProduct bcdDevice bcdUSB
    strings/0x409/{manufacturer,product,serialnumber}
    configs/c.1/MaxPower                 configs/c.1/strings/0x409/configuration
    functions/ffs.<instance>/            functions/acm.<instance>/ (optional)
    configs/c.1/ffs.<instance> -> functions/ffs.<instance>   (symlinks, one per function)
    UDC                                  (bind: the UDC's name; unbind: an empty line)

Teardown is the reverse: unbind, remove the config's links, the config's strings and the config,
the functions, the gadget's strings, then the gadget directory. A gadget left behind by a crashed
run (same name) is found and torn down before a new one is created.

`root` is configurable so tests can point it at a plain directory tree. Real configfs creates the
default groups (`strings`, `configs`, `functions`) and the attribute files itself and cannot delete
attribute files; a plain tree needs both done by hand. `_remove_dir` copes with both.

What this module does not do: serve any endpoint (that is `gadget.functionfs`), or load kernel
modules (the board profile's `modules-load=` does; `ensure_configfs_mounted` only mounts configfs).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

DEFAULT_CONFIGFS = Path("/sys/kernel/config")
DEFAULT_UDC_CLASS = Path("/sys/class/udc")
LANG_EN_US = "0x409"
CONFIG_NAME = "c.1"


class GadgetError(Exception):
    """The gadget cannot be composed, bound or torn down (message says which step and why)."""


@dataclass(frozen=True)
class GadgetConfig:
    """What the host will see of the gadget (device level) and which functions it carries."""

    name: str = "usbmirror"  # directory under usb_gadget/; also marks the gadget as ours
    vendor_id: int = 0x1209  # pid.codes test VID; set your own for a product
    product_id: int = 0x0001
    bcd_device: int = 0x0100
    bcd_usb: int = 0x0320  # USB 3.2 capable; the UDC lowers it for its real speed
    manufacturer: str = "usbmirror"
    product: str = "usbmirror disk"
    serial: str = "0000000000000000"
    configuration: str = "mass storage"
    max_power_ma: int = 250
    ffs_instance: str = "usbmirror"  # functions/ffs.<this>; also the FunctionFS mount's device name
    acm: bool = False  # add functions/acm.<acm_instance> (status console)
    acm_instance: str = "usbmirror"

    def __post_init__(self) -> None:
        for field, value in (("vendor_id", self.vendor_id), ("product_id", self.product_id),
                             ("bcd_device", self.bcd_device), ("bcd_usb", self.bcd_usb)):
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"{field} must fit 16 bits, not {value:#x}")
        for field, text in (("name", self.name), ("ffs_instance", self.ffs_instance),
                            ("acm_instance", self.acm_instance)):
            if not text or "/" in text or "." in text or text.strip() != text:
                raise ValueError(f"{field} must be a plain name (no '/', '.', spaces): {text!r}")
        if not 0 < self.max_power_ma <= 900:
            raise ValueError(f"max_power_ma must be 1..900, not {self.max_power_ma}")


def list_udcs(udc_class: Path = DEFAULT_UDC_CLASS) -> list[str]:
    """Names of the USB device controllers the kernel offers, sorted (e.g. `fe980000.usb`)."""
    try:
        return sorted(p.name for p in udc_class.iterdir())
    except FileNotFoundError:
        return []


def pick_udc(requested: str | None, udc_class: Path = DEFAULT_UDC_CLASS) -> str:
    """The UDC to bind: `requested` if the kernel has it, else the first one; GadgetError if none."""
    available = list_udcs(udc_class)
    if requested:
        if requested not in available:
            raise GadgetError(
                f"UDC {requested!r} not found in {udc_class} (available: {', '.join(available) or 'none'});"
                " is the controller in device mode (dtoverlay=dwc2 / dr_mode=peripheral) and its module loaded?"
            )
        return requested
    if not available:
        raise GadgetError(
            f"no USB device controller in {udc_class}: load the UDC driver (dwc2, dwc3, dummy_hcd) and"
            " check the board profile's overlay"
        )
    return available[0]


def udc_state(udc: str, udc_class: Path = DEFAULT_UDC_CLASS) -> str:
    """The UDC's state as the kernel reports it (`configured`, `not attached`, ...), or `unknown`."""
    try:
        return (udc_class / udc / "state").read_text().strip()
    except OSError:
        return "unknown"


def udc_speed(udc: str, udc_class: Path = DEFAULT_UDC_CLASS) -> str:
    """Negotiated speed (`high-speed`, `super-speed`, `UNKNOWN`), or `unknown` when unreadable."""
    try:
        return (udc_class / udc / "current_speed").read_text().strip()
    except OSError:
        return "unknown"


def ensure_configfs_mounted(root: Path = DEFAULT_CONFIGFS) -> None:
    """Mount configfs at `root` when the kernel has it but nothing is mounted there yet."""
    if (root / "usb_gadget").is_dir():
        return
    result = subprocess.run(["mount", "-t", "configfs", "configfs", str(root)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0 or not (root / "usb_gadget").is_dir():
        raise GadgetError(
            f"configfs has no usb_gadget at {root} ({result.stderr.strip() or 'mounted'}):"
            " load libcomposite (modules-load=dwc2,libcomposite)"
        )


def _write_attr(path: Path, value: str) -> None:
    """Write one configfs attribute with a single unbuffered write so the kernel's error surfaces."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (value + "\n").encode())
    except OSError as exc:
        raise GadgetError(f"writing {value!r} to {path} failed: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    """rmdir a configfs group. On real configfs that removes its attributes and default groups;
    on a plain directory tree (tests) leftover files and empty default groups are removed first."""
    try:
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise GadgetError(f"cannot remove {path}: {exc.strerror}") from exc
    try:
        for child in path.iterdir():
            if child.is_symlink() or child.is_file():
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
            elif child.is_dir():
                _remove_dir(child)
        os.rmdir(path)
    except OSError as exc:
        raise GadgetError(f"cannot remove {path}: {exc.strerror}") from exc


def _remove_languages(strings: Path) -> None:
    """rmdir each language group (`0x409`, ...) under a `strings` default group."""
    if strings.is_dir():
        for lang in strings.iterdir():
            if lang.is_dir():
                _remove_dir(lang)


class ConfigFsGadget:
    """One libcomposite gadget in configfs. Context manager: `__enter__` composes it (after removing
    a stale one of the same name), `__exit__` unbinds and removes it. `bind()` is separate because
    FunctionFS requires its descriptors written before the UDC is bound."""

    def __init__(
        self,
        config: GadgetConfig,
        *,
        configfs_root: Path = DEFAULT_CONFIGFS,
        udc_class: Path = DEFAULT_UDC_CLASS,
    ) -> None:
        self.config = config
        self.configfs_root = Path(configfs_root)
        self.udc_class = Path(udc_class)
        self.path = self.configfs_root / "usb_gadget" / config.name
        self.bound_udc: str | None = None

    # -- paths ------------------------------------------------------------------------------
    @property
    def ffs_function(self) -> str:
        return f"ffs.{self.config.ffs_instance}"

    @property
    def acm_function(self) -> str:
        return f"acm.{self.config.acm_instance}"

    def acm_tty(self, dev: Path = Path("/dev")) -> Path | None:
        """Device-side tty of the ACM function (`/dev/ttyGS<port_num>`), None without ACM."""
        if not self.config.acm:
            return None
        try:
            port = int((self.path / "functions" / self.acm_function / "port_num").read_text().strip())
        except (OSError, ValueError):
            port = 0
        return dev / f"ttyGS{port}"

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> ConfigFsGadget:
        self.create()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def remove_stale(self) -> bool:
        """Tear down a gadget of ours left by a crashed run. True when one was found."""
        if not self.path.exists():
            return False
        log.warning("removing stale gadget path=%s", self.path)
        self.remove()
        return True

    def create(self) -> None:
        """Compose the gadget (not bound). Removes a stale one of the same name first."""
        if not (self.configfs_root / "usb_gadget").is_dir():
            raise GadgetError(
                f"{self.configfs_root}/usb_gadget does not exist: mount configfs and load libcomposite"
            )
        self.remove_stale()
        c = self.config
        g = self.path
        try:
            g.mkdir()
            _write_attr(g / "idVendor", f"{c.vendor_id:#06x}")
            _write_attr(g / "idProduct", f"{c.product_id:#06x}")
            _write_attr(g / "bcdDevice", f"{c.bcd_device:#06x}")
            _write_attr(g / "bcdUSB", f"{c.bcd_usb:#06x}")
            strings = g / "strings" / LANG_EN_US
            strings.mkdir(parents=True, exist_ok=True)
            _write_attr(strings / "manufacturer", c.manufacturer)
            _write_attr(strings / "product", c.product)
            _write_attr(strings / "serialnumber", c.serial)
            cfg = g / "configs" / CONFIG_NAME
            cfg.mkdir(parents=True, exist_ok=True)
            _write_attr(cfg / "MaxPower", str(c.max_power_ma))
            cfg_strings = cfg / "strings" / LANG_EN_US
            cfg_strings.mkdir(parents=True, exist_ok=True)
            _write_attr(cfg_strings / "configuration", c.configuration)
            functions = g / "functions"
            functions.mkdir(exist_ok=True)
            names = [self.ffs_function] + ([self.acm_function] if c.acm else [])
            for name in names:
                (functions / name).mkdir()
                os.symlink(functions / name, cfg / name)
        except OSError as exc:
            self.remove()
            raise GadgetError(f"composing gadget {g} failed: {exc}") from exc
        log.info("gadget composed path=%s vid=%#06x pid=%#06x serial=%s acm=%s",
                 g, c.vendor_id, c.product_id, c.serial, c.acm)

    def bind(self, udc: str | None = None) -> str:
        """Bind to `udc` (or the first available). Returns the UDC's name."""
        name = pick_udc(udc, self.udc_class)
        _write_attr(self.path / "UDC", name)
        self.bound_udc = name
        log.info("gadget bound udc=%s", name)
        return name

    def unbind(self) -> None:
        """Detach from the UDC (the host sees a disconnect). No-op when not bound."""
        udc_file = self.path / "UDC"
        current = self.current_udc()
        if current:
            try:
                _write_attr(udc_file, "")
            except GadgetError as exc:
                log.warning("unbind failed path=%s error=%s", udc_file, exc)
            log.info("gadget unbound udc=%s", current)
        self.bound_udc = None

    def current_udc(self) -> str:
        """The UDC the gadget is bound to according to configfs ('' when unbound)."""
        try:
            return (self.path / "UDC").read_text().strip()
        except OSError:
            return ""

    def remove(self) -> None:
        """Unbind and remove everything under the gadget, in the order configfs requires."""
        g = self.path
        if not g.exists():
            return
        self.unbind()
        configs = g / "configs"
        if configs.is_dir():
            for cfg in sorted(configs.iterdir()):
                if not cfg.is_dir():
                    continue
                for entry in cfg.iterdir():
                    if entry.is_symlink():
                        entry.unlink()
                _remove_languages(cfg / "strings")
                _remove_dir(cfg)
        functions = g / "functions"
        if functions.is_dir():
            for fn in sorted(functions.iterdir()):
                if fn.is_dir():
                    _remove_dir(fn)
        _remove_languages(g / "strings")
        os_desc = g / "os_desc"
        if os_desc.is_dir():
            for entry in os_desc.iterdir():
                if entry.is_symlink():
                    entry.unlink()
        _remove_dir(g)
        log.info("gadget removed path=%s", g)


# -- FunctionFS mount ------------------------------------------------------------------------
Mounter = Callable[[list[str]], None]


def _run_mount(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GadgetError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def is_mountpoint(path: Path, mounts: Path = Path("/proc/self/mounts")) -> bool:
    try:
        text = mounts.read_text()
    except OSError:
        return False
    target = str(path.resolve())
    return any(line.split()[1:2] == [target] for line in text.splitlines())


class FunctionFsMount:
    """`mount -t functionfs <instance> <mountpoint>`, unmounted on exit. A stale mount at the same
    place (crashed run) is unmounted first. `mounter` runs the mount/umount argv (tests fake it)."""

    def __init__(self, instance: str, mountpoint: Path, *, mounter: Mounter = _run_mount,
                 mounts: Path = Path("/proc/self/mounts")) -> None:
        self.instance = instance
        self.mountpoint = Path(mountpoint)
        self._mounter = mounter
        self._mounts = mounts

    def __enter__(self) -> Path:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mountpoint(self.mountpoint, self._mounts):
            log.warning("unmounting stale functionfs mountpoint=%s", self.mountpoint)
            self._mounter(["umount", str(self.mountpoint)])
        self._mounter(["mount", "-t", "functionfs", self.instance, str(self.mountpoint)])
        return self.mountpoint

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for attempt in range(20):
            try:
                self._mounter(["umount", str(self.mountpoint)])
                return
            except GadgetError as err:
                if attempt == 19:
                    log.warning("functionfs umount failed mountpoint=%s error=%s", self.mountpoint, err)
                time.sleep(0.05)


# -- ACM status console ----------------------------------------------------------------------
class AcmStatusConsole:
    """Writes a status text to the device side of the ACM function every `interval` seconds, so a
    host can read the unit's state with any serial terminal. Read-only: whatever the host types is
    read and discarded. Writes never block the unit: the tty is opened non-blocking and a host that
    is not reading simply misses lines."""

    def __init__(self, tty: Path, render: Callable[[], str], *, interval: float = 1.0) -> None:
        self.tty = tty
        self._render = render
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lines_written = 0

    def __enter__(self) -> AcmStatusConsole:
        self._thread = threading.Thread(target=self._run, name="acm-status", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _open(self) -> int | None:
        try:
            fd = os.open(self.tty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("acm tty not ready tty=%s error=%s", self.tty, exc.strerror)
            return None
        try:
            import termios

            attrs = termios.tcgetattr(fd)
            attrs[1] &= ~termios.OPOST  # oflag: keep "\r\n" as written
            attrs[3] &= ~(termios.ECHO | termios.ICANON)  # lflag: never echo host input back
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except (ImportError, OSError) as exc:
            log.debug("acm tty raw mode failed tty=%s error=%s", self.tty, exc)
        return fd

    def _run(self) -> None:
        fd: int | None = None
        while not self._stop.is_set():
            if fd is None:
                fd = self._open()
            if fd is not None:
                try:
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 4096)  # discard host input: the console is read-only
                    text = self._render().replace("\r\n", "\n").replace("\n", "\r\n")
                    os.write(fd, text.encode("utf-8", "replace"))
                    self.lines_written += text.count("\n")
                except BlockingIOError:
                    pass  # the host is not reading: drop this refresh
                except OSError as exc:
                    log.debug("acm write failed tty=%s error=%s", self.tty, exc.strerror)
                    os.close(fd)
                    fd = None
            self._stop.wait(self._interval)
        if fd is not None:
            os.close(fd)


def render_status_text(status: Mapping[str, object]) -> str:
    """One status block for the console: `key: value` lines between markers a reader can split on."""
    lines = ["--- usbmirror status ---"]
    for key in sorted(status):
        value = status[key]
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={v}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
            lines.append(f"{key}: {inner}")
        else:
            lines.append(f"{key}: {value}")
    lines.append("--- end ---")
    return "\n".join(lines) + "\n"
